//! The audit outbox in PostgreSQL, written by several replicas and shipped
//! by one at a time.
//!
//! - [`PgOutbox::push`] signs an event and inserts it inside the caller's
//!   transaction, under the next per-source sequence number taken from a
//!   counter row (`INSERT … ON CONFLICT DO UPDATE … RETURNING`). The row
//!   stays locked until that transaction ends, so concurrent writers take
//!   their numbers one after another and commit in that order: a reader
//!   never sees a gap that fills later. A rolled-back transaction gives
//!   its number back with the counter. The same transaction calls
//!   `pg_notify`, delivered to listeners at commit.
//! - [`PgOutbox`] implements [`OutboxStore`], so the runtime's shipper
//!   ships it unchanged; [`OutboxStore::notified`] wakes on the NOTIFY of
//!   any replica's commit, or after [`POLL`] at the latest.
//! - [`spawn_leased`] runs the shipper only while this replica's session
//!   holds the shipping lease, a session-level advisory lock
//!   (`pg_try_advisory_lock`). The shipper's reads and writes go through
//!   that same session, so when it dies (the process, the network, the
//!   server) the lock is released by the server and the shipper can no
//!   longer touch the outbox; the task watching the session aborts it at
//!   once and the replica competes for the lease again. Another replica
//!   takes over within [`LEASE_RETRY`]. An event sent twice across a
//!   takeover is stored once: audit answers a repeated sequence number as
//!   a duplicate at the same leaf.
//! - [`PgOutbox::wait_settled`] lets any replica wait until its event is
//!   settled by whichever replica ships (woken by the shipper's NOTIFY
//!   after each settle, polling every [`POLL`] besides).
//!
//! The tables are this crate's migrations of component [`COMPONENT`]
//! (`outbox`), migrated by [`migrate`] in the service's own database.
//! Acknowledgements mean committed with the server's default
//! `synchronous_commit = on`.

use std::{sync::Arc, time::Duration};

use prost::Message;
use tokio::sync::{Mutex, Notify, watch};
use tokio_postgres::{Client, Transaction};
use twokey_proto::audit::v1::{Event, SignedEvent};
use twokey_runtime::{
    events::{EventDraft, EventSigner},
    outbox::{OutboxError, OutboxStore, RequeueError, Unrecoverable},
    time::Clock,
};

use crate::{
    connect::{PgSettings, connect_listening},
    error::PgError,
    migrate::{Migrated, Migration},
};

/// The migration component of the outbox tables.
pub const COMPONENT: &str = "outbox";

/// The outbox tables, in order (forward only).
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "outbox: sequence counter, pending and kept events, accepted checkpoint",
    sql: "
CREATE TABLE twokey_outbox_seq (
    source   text   PRIMARY KEY,
    next_seq bigint NOT NULL
);
CREATE TABLE twokey_outbox_pending (
    source  text    NOT NULL,
    seq     bigint  NOT NULL,
    event   bytea   NOT NULL,
    time_s  bigint  NOT NULL,
    time_ns integer NOT NULL,
    leaf    bigint,
    PRIMARY KEY (source, seq)
);
CREATE TABLE twokey_outbox_kept (
    source  text    NOT NULL,
    leaf    bigint  NOT NULL,
    seq     bigint  NOT NULL,
    event   bytea   NOT NULL,
    time_s  bigint  NOT NULL,
    time_ns integer NOT NULL,
    PRIMARY KEY (source, leaf)
);
CREATE INDEX twokey_outbox_kept_seq ON twokey_outbox_kept (source, seq);
CREATE TABLE twokey_outbox_checkpoint (
    source text PRIMARY KEY,
    note   text NOT NULL
);
",
}];

/// The NOTIFY channel a push signals at commit (payload: the source).
const CHANNEL: &str = "twokey_outbox";
/// The NOTIFY channel the shipper signals after settling (payload: the
/// source), for replicas waiting until their event is acknowledged.
const SETTLED_CHANNEL: &str = "twokey_outbox_settled";

/// An event was not acknowledged in time.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// Not settled before the deadline (audit or the shipping replica is
    /// down, or slow).
    #[error("audit unavailable: event {0} not acknowledged in time")]
    Timeout(u64),
    /// The database failed while waiting.
    #[error(transparent)]
    Db(#[from] PgError),
}

/// Opens a session listening for `source`'s pushes (waking `notify`) and
/// settles (waking `settled`); both are woken when it ends, so the shipper
/// and the waiters find out.
async fn listening_session(
    settings: &PgSettings,
    source: &str,
    notify: &Arc<Notify>,
    settled: &Arc<Notify>,
) -> Result<Client, PgError> {
    let (client, mut notifications) = connect_listening(settings).await?;
    client
        .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {SETTLED_CHANNEL}"))
        .await?;
    let (notify, settled, source) = (notify.clone(), settled.clone(), source.to_owned());
    tokio::spawn(async move {
        while let Some(n) = notifications.recv().await {
            if n.payload() != source {
                continue;
            }
            if n.channel() == SETTLED_CHANNEL {
                settled.notify_waiters();
            } else {
                notify.notify_one();
            }
        }
        notify.notify_one();
        settled.notify_waiters();
    });
    Ok(client)
}

/// Longest wait of [`OutboxStore::notified`] without a notification: a
/// NOTIFY lost with a connection delays shipping by this much at most.
pub const POLL: Duration = Duration::from_secs(1);

/// How often a replica without the lease tries to take it, and how often
/// the holder checks that its session is alive.
pub const LEASE_RETRY: Duration = Duration::from_millis(500);

/// Brings the outbox tables to this binary's version.
pub async fn migrate(client: &mut Client) -> Result<Migrated, PgError> {
    crate::migrate(client, COMPONENT, MIGRATIONS).await
}

fn to_db(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn from_db(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn outbox_error(e: impl Into<PgError>) -> OutboxError {
    let e = e.into();
    if e.is_unavailable() {
        OutboxError::Unavailable(e.to_string())
    } else {
        OutboxError::Failed(e.to_string())
    }
}

type Observer = Arc<dyn Fn(&Event) + Send + Sync>;

/// A source's outbox in PostgreSQL, on a session of its own (which
/// listens for the pushes' notifications and, in [`spawn_leased`], holds
/// the shipping lease).
#[derive(Clone)]
pub struct PgOutbox {
    client: Arc<Mutex<Client>>,
    signer: Arc<EventSigner>,
    source: String,
    clock: Arc<dyn Clock>,
    notify: Arc<Notify>,
    settled: Arc<Notify>,
    observer: Option<Observer>,
    /// Set by [`PgOutbox::reopening`]: a closed session is opened again.
    reopen: Option<PgSettings>,
}

impl std::fmt::Debug for PgOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOutbox")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl PgOutbox {
    /// Opens a session to the outbox's database and listens there for the
    /// notifications of pushes (from any replica). The tables must exist
    /// ([`migrate`]).
    pub async fn connect(
        settings: &PgSettings,
        signer: Arc<EventSigner>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, PgError> {
        let notify = Arc::new(Notify::new());
        let settled = Arc::new(Notify::new());
        let source = signer.source().to_string();
        let client = listening_session(settings, &source, &notify, &settled).await?;
        Ok(Self {
            client: Arc::new(Mutex::new(client)),
            signer,
            source,
            clock,
            notify,
            settled,
            observer: None,
            reopen: None,
        })
    }

    /// The same outbox, opening its session again (and listening again)
    /// when it finds it closed — the database restarted — instead of
    /// failing every call from then on. For an outbox that only waits and
    /// emits (a store's); never for the shipping lease's, which is tied to
    /// its session ([`spawn_leased`] connects a new outbox instead).
    pub fn reopening(mut self, settings: &PgSettings) -> Self {
        self.reopen = Some(settings.clone());
        self
    }

    /// The outbox's session: opened again first if it is closed and this
    /// outbox is [`PgOutbox::reopening`].
    async fn session(&self) -> Result<tokio::sync::MutexGuard<'_, Client>, PgError> {
        let mut client = self.client.lock().await;
        if let Some(settings) = self.reopen.as_ref().filter(|_| client.is_closed()) {
            *client =
                listening_session(settings, &self.source, &self.notify, &self.settled).await?;
            tracing::info!(source = %self.source, "the outbox's session is open again");
        }
        Ok(client)
    }

    /// Whether event `seq` (pushed by any replica) is settled: acknowledged
    /// by audit, and covered by a checkpoint the shipper verified when it
    /// checks receipts.
    pub async fn is_settled(&self, seq: u64) -> Result<bool, PgError> {
        let client = self.session().await?;
        let row = client
            .query_one(
                "SELECT $2 < coalesce(
                            (SELECT next_seq FROM twokey_outbox_seq WHERE source = $1), 1)
                        AND NOT EXISTS (SELECT 1 FROM twokey_outbox_pending
                                        WHERE source = $1 AND seq <= $2)",
                &[&self.source, &to_db(seq)],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Waits until event `seq` is settled, at most `timeout`, whichever
    /// replica ships: woken by the shipper's NOTIFY after each settle, and
    /// looking again every [`POLL`] in case one is lost.
    pub async fn wait_settled(&self, seq: u64, timeout: Duration) -> Result<(), WaitError> {
        let wait = async {
            loop {
                let woken = self.settled.notified();
                if self.is_settled(seq).await? {
                    return Ok(());
                }
                tokio::select! {
                    () = woken => {}
                    () = tokio::time::sleep(POLL) => {}
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or(Err(WaitError::Timeout(seq)))
    }

    /// Calls `observer` with each event once the audit service has
    /// acknowledged it.
    pub fn with_ack_observer(mut self, observer: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// Signs `draft` as the next event of this source and inserts it in
    /// `tx`, the transaction of the state change it records (on any
    /// session); returns its sequence number. Until `tx` ends, other
    /// pushes of this source wait for the number after it.
    pub async fn push(&self, tx: &Transaction<'_>, draft: EventDraft) -> Result<u64, PgError> {
        let row = tx
            .query_one(
                "INSERT INTO twokey_outbox_seq (source, next_seq) VALUES ($1, 2)
                 ON CONFLICT (source) DO UPDATE SET next_seq = twokey_outbox_seq.next_seq + 1
                 RETURNING next_seq - 1",
                &[&self.source],
            )
            .await?;
        let seq = from_db(row.get(0));
        let event = draft.into_event(self.signer.source(), seq, self.clock.now());
        let time = event.time.unwrap_or_default();
        let signed = self.signer.sign(&event);
        tx.execute(
            "INSERT INTO twokey_outbox_pending (source, seq, event, time_s, time_ns)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &self.source,
                &to_db(seq),
                &signed.encode_to_vec(),
                &time.seconds,
                &time.nanos,
            ],
        )
        .await?;
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &self.source])
            .await?;
        Ok(seq)
    }

    /// Records an event that goes with no other state change, in a
    /// transaction of its own on this outbox's session; returns once it is
    /// committed.
    pub async fn emit(&self, draft: EventDraft) -> Result<u64, PgError> {
        let mut client = self.session().await?;
        let tx = client.transaction().await?;
        let seq = self.push(&tx, draft).await?;
        tx.commit().await?;
        Ok(seq)
    }

    /// Tries to take the shipping lease on this outbox's session: true
    /// when this session holds it (until the session ends).
    pub async fn try_lease(&self) -> Result<bool, PgError> {
        let client = self.client.lock().await;
        let row = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext('twokey-outbox-ship:' || $1))",
                &[&self.source],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Whether this outbox's session is still alive (asks the server).
    pub async fn alive(&self) -> bool {
        let client = self.client.lock().await;
        !client.is_closed() && client.simple_query("").await.is_ok()
    }

    async fn count(&self, sql: &str) -> Result<usize, OutboxError> {
        let client = self.client.lock().await;
        let row = client
            .query_one(sql, &[&self.source])
            .await
            .map_err(outbox_error)?;
        Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    async fn events(
        client: &(impl tokio_postgres::GenericClient + Sync),
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<(u64, SignedEvent)>, OutboxError> {
        let rows = client.query(sql, params).await.map_err(outbox_error)?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let n: i64 = r.get(0);
                let bytes: Vec<u8> = r.get(1);
                Some((from_db(n), SignedEvent::decode(bytes.as_slice()).ok()?))
            })
            .collect())
    }
}

impl OutboxStore for PgOutbox {
    fn signer(&self) -> &EventSigner {
        &self.signer
    }

    fn observe_acked(&self, event: &Event) {
        if let Some(o) = &self.observer {
            o(event);
        }
    }

    async fn notified(&self) {
        tokio::select! {
            () = self.notify.notified() => {}
            () = tokio::time::sleep(POLL) => {}
        }
    }

    async fn next_seq(&self) -> Result<u64, OutboxError> {
        let client = self.client.lock().await;
        let row = client
            .query_opt(
                "SELECT next_seq FROM twokey_outbox_seq WHERE source = $1",
                &[&self.source],
            )
            .await
            .map_err(outbox_error)?;
        Ok(row.map_or(1, |r| from_db(r.get(0))))
    }

    async fn first_pending(&self) -> Result<Option<u64>, OutboxError> {
        let client = self.client.lock().await;
        let row = client
            .query_one(
                "SELECT min(seq) FROM twokey_outbox_pending WHERE source = $1",
                &[&self.source],
            )
            .await
            .map_err(outbox_error)?;
        Ok(row.get::<_, Option<i64>>(0).map(from_db))
    }

    async fn pending(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, SignedEvent)>, OutboxError> {
        let client = self.client.lock().await;
        Self::events(
            &*client,
            "SELECT seq, event FROM twokey_outbox_pending
             WHERE source = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
            &[&self.source, &to_db(from), &(limit as i64)],
        )
        .await
    }

    async fn depth(&self) -> Result<usize, OutboxError> {
        self.count("SELECT count(*) FROM twokey_outbox_pending WHERE source = $1")
            .await
    }

    async fn record_leaf(&self, seq: u64, index: u64) -> Result<(), OutboxError> {
        let client = self.client.lock().await;
        client
            .execute(
                "UPDATE twokey_outbox_pending SET leaf = $3 WHERE source = $1 AND seq = $2",
                &[&self.source, &to_db(seq), &to_db(index)],
            )
            .await
            .map_err(outbox_error)?;
        Ok(())
    }

    async fn settle_through(&self, seq: u64) -> Result<(), OutboxError> {
        // One statement: atomic, as the sled outbox's one batch.
        let client = self.client.lock().await;
        client
            .execute(
                "WITH moved AS (
                     DELETE FROM twokey_outbox_pending WHERE source = $1 AND seq <= $2
                     RETURNING source, seq, event, time_s, time_ns, leaf)
                 INSERT INTO twokey_outbox_kept (source, leaf, seq, event, time_s, time_ns)
                 SELECT source, leaf, seq, event, time_s, time_ns FROM moved
                 WHERE leaf IS NOT NULL
                 ON CONFLICT (source, leaf) DO UPDATE SET seq = EXCLUDED.seq,
                     event = EXCLUDED.event, time_s = EXCLUDED.time_s,
                     time_ns = EXCLUDED.time_ns",
                &[&self.source, &to_db(seq)],
            )
            .await
            .map_err(outbox_error)?;
        // Wakes the replicas waiting for their events (delivered at once:
        // the statement above is committed).
        client
            .execute(
                "SELECT pg_notify($1, $2)",
                &[&SETTLED_CHANNEL, &self.source],
            )
            .await
            .map_err(outbox_error)?;
        Ok(())
    }

    async fn kept_from(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, SignedEvent)>, OutboxError> {
        let mut client = self.client.lock().await;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(outbox_error)?;
        let mut out = Self::events(
            &tx,
            "SELECT leaf, event FROM twokey_outbox_kept
             WHERE source = $1 AND leaf >= $2 ORDER BY leaf LIMIT $3",
            &[&self.source, &to_db(from), &(limit as i64)],
        )
        .await?;
        if out.len() < limit {
            // Then pending events whose acknowledgement is known.
            let after = out.last().map_or(-1, |(i, _)| to_db(*i));
            let rest = (limit - out.len()) as i64;
            out.extend(
                Self::events(
                    &tx,
                    "SELECT leaf, event FROM twokey_outbox_pending
                     WHERE source = $1 AND leaf IS NOT NULL AND leaf >= $2 AND leaf > $3
                     ORDER BY leaf LIMIT $4",
                    &[&self.source, &to_db(from), &after, &rest],
                )
                .await?,
            );
        }
        tx.commit().await.map_err(outbox_error)?;
        Ok(out)
    }

    async fn requeue_from(&self, seq: u64) -> Result<(), RequeueError> {
        let fail = |e: tokio_postgres::Error| RequeueError::Outbox(outbox_error(e));
        let mut client = self.client.lock().await;
        let tx = client.transaction().await.map_err(fail)?;
        let row = tx
            .query_one(
                "SELECT coalesce(
                     (SELECT min(seq) FROM twokey_outbox_pending WHERE source = $1),
                     (SELECT next_seq FROM twokey_outbox_seq WHERE source = $1),
                     1)",
                &[&self.source],
            )
            .await
            .map_err(fail)?;
        let oldest_pending: i64 = row.get(0);
        let seq = to_db(seq);
        if seq >= oldest_pending {
            return Ok(());
        }
        // Kept events from `seq` below the pending ones go back; the
        // oldest of them must be `seq` itself, or events were lost.
        let row = tx
            .query_one(
                "SELECT min(seq) FROM twokey_outbox_kept
                 WHERE source = $1 AND seq >= $2 AND seq < $3",
                &[&self.source, &seq, &oldest_pending],
            )
            .await
            .map_err(fail)?;
        let lowest = row.get::<_, Option<i64>>(0).unwrap_or(oldest_pending);
        if lowest > seq {
            return Err(RequeueError::Unrecoverable(Unrecoverable {
                expected: from_db(seq),
                kept_from: from_db(lowest),
            }));
        }
        tx.execute(
            "INSERT INTO twokey_outbox_pending (source, seq, event, time_s, time_ns)
             SELECT source, seq, event, time_s, time_ns FROM twokey_outbox_kept
             WHERE source = $1 AND seq >= $2 AND seq < $3
             ON CONFLICT (source, seq) DO NOTHING",
            &[&self.source, &seq, &oldest_pending],
        )
        .await
        .map_err(fail)?;
        tx.execute(
            "DELETE FROM twokey_outbox_kept WHERE source = $1 AND seq >= $2",
            &[&self.source, &seq],
        )
        .await
        .map_err(fail)?;
        tx.commit().await.map_err(fail)?;
        Ok(())
    }

    async fn prune_kept(&self, cutoff: std::time::SystemTime) -> Result<usize, OutboxError> {
        let cutoff = twokey_runtime::time::to_timestamp(cutoff);
        let client = self.client.lock().await;
        // Oldest first, up to the first event at or after the cutoff.
        let n = client
            .execute(
                "DELETE FROM twokey_outbox_kept WHERE source = $1 AND leaf < coalesce(
                     (SELECT min(leaf) FROM twokey_outbox_kept
                      WHERE source = $1 AND (time_s, time_ns) >= ($2, $3)),
                     9223372036854775807)",
                &[&self.source, &cutoff.seconds, &cutoff.nanos],
            )
            .await
            .map_err(outbox_error)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    async fn kept(&self) -> Result<usize, OutboxError> {
        self.count("SELECT count(*) FROM twokey_outbox_kept WHERE source = $1")
            .await
    }

    async fn accepted_checkpoint(&self) -> Result<Option<String>, OutboxError> {
        let client = self.client.lock().await;
        let row = client
            .query_opt(
                "SELECT note FROM twokey_outbox_checkpoint WHERE source = $1",
                &[&self.source],
            )
            .await
            .map_err(outbox_error)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn set_accepted_checkpoint(&self, note: &str) -> Result<(), OutboxError> {
        let client = self.client.lock().await;
        client
            .execute(
                "INSERT INTO twokey_outbox_checkpoint (source, note) VALUES ($1, $2)
                 ON CONFLICT (source) DO UPDATE SET note = EXCLUDED.note",
                &[&self.source, &note],
            )
            .await
            .map_err(outbox_error)?;
        Ok(())
    }
}

/// A replica's part in shipping: whether it holds the lease now.
#[derive(Debug)]
pub struct Leased {
    shipping: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Leased {
    /// True while this replica holds the lease and ships.
    pub fn shipping(&self) -> bool {
        *self.shipping.borrow()
    }

    /// Waits until this replica ships (`true`) or stops shipping (`false`).
    pub async fn wait_shipping(&self, shipping: bool) {
        let mut rx = self.shipping.clone();
        let _ = rx.wait_for(|s| *s == shipping).await;
    }

    /// Stops competing for the lease, and shipping if it was: the session
    /// closes and the lease goes to another replica.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Aborts the shipper task when dropped, so that a stopped lease loop
/// never leaves a shipper running.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Competes for the shipping lease of `signer`'s source in the database
/// of `settings`, and runs `ship` (which starts the shipper, e.g.
/// `twokey_runtime::shipper::spawn_shipper_with`) on the session that
/// holds it, for as long as it does. A session that cannot be opened or
/// dies is logged as shipping paused and retried every [`LEASE_RETRY`].
pub fn spawn_leased<F>(
    settings: PgSettings,
    signer: Arc<EventSigner>,
    clock: Arc<dyn Clock>,
    ship: F,
) -> Leased
where
    F: Fn(PgOutbox) -> tokio::task::JoinHandle<()> + Send + 'static,
{
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let source = signer.source().to_string();
        loop {
            let outbox = match PgOutbox::connect(&settings, signer.clone(), clock.clone()).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(%source, "audit shipping paused: {e}; retrying");
                    tokio::time::sleep(LEASE_RETRY).await;
                    continue;
                }
            };
            if !take_lease(&outbox, &source).await {
                continue;
            }
            tracing::info!(%source, "this replica holds the shipping lease: shipping to audit");
            let shipper = AbortOnDrop(ship(outbox.clone()));
            tx.send_replace(true);
            while !shipper.0.is_finished() && outbox.alive().await {
                tokio::time::sleep(LEASE_RETRY).await;
            }
            let ended = shipper.0.is_finished();
            // Dropping the shipper and the session gives the lease back.
            drop(shipper);
            drop(outbox);
            tx.send_replace(false);
            if ended {
                tracing::error!(
                    %source,
                    "audit shipping paused: the shipper ended on its own; giving the lease up \
                     and competing for it again"
                );
            } else {
                tracing::warn!(
                    %source,
                    "audit shipping paused: the shipping lease is lost (its PostgreSQL session \
                     ended); stopped shipping, and competing for the lease again"
                );
            }
        }
    });
    Leased { shipping: rx, task }
}

/// Waits until `outbox`'s session holds the lease (true) or dies (false).
async fn take_lease(outbox: &PgOutbox, source: &str) -> bool {
    loop {
        match outbox.try_lease().await {
            Ok(true) => return true,
            Ok(false) => tokio::time::sleep(LEASE_RETRY).await,
            Err(e) => {
                tracing::warn!(%source, "audit shipping paused: {e}; retrying");
                tokio::time::sleep(LEASE_RETRY).await;
                return false;
            }
        }
    }
}
