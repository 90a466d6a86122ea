//! The log in PostgreSQL ([`PgLogStore`]): entries with their leaf data,
//! leaf hash, receive time and the query fields (SQL indexes on request
//! id, account, actor, actor name, action and event time; a unique index
//! on (source, seq) is the seq → index map), the roots of every complete
//! subtree, and the largest signed tree head.
//!
//! Appends are staged in memory (reads see them, as with sled); a group is
//! written by [`PgLogStore::commit_group`]: its entries, their nodes and
//! the checkpoint signed over them in ONE transaction, committed with
//! `synchronous_commit = on`. That commit is the acknowledgement point: no
//! local journal, the database is the log. The transaction runs on the
//! session that holds the sequencer lease (a session advisory lock), so a
//! replica whose session died cannot commit, and the head row is updated
//! only from the size this sequencer loaded (compare and set).
//!
//! The trait [`LogStore`] is synchronous (sled and the tiles read local
//! files); the PostgreSQL sessions run on a small runtime of their own, and
//! a read blocks its caller until the answer comes, bounded by
//! [`READ_TIMEOUT`].

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use prost::Message;
use tokio_postgres::Client;
use twokey_pgstore::{Migration, PgError, PgSettings, sessions::StoreRuntime};
use twokey_proto::{
    Timestamp,
    audit::v1::{Event, LogEntry, SignedEvent},
};

use super::{LogStore, Walk, by_index};
use crate::{
    error::AuditError,
    head::TreeHead,
    merkle::{Hash, leaf_hash, node_hash},
};

/// The audit schema (component `audit` of [`twokey_pgstore::migrate`]).
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "audit log: entries, subtree roots, signed tree head",
    sql: "
CREATE TABLE audit_entries (
    idx         bigint  PRIMARY KEY CHECK (idx >= 0),
    leaf_data   bytea   NOT NULL,
    leaf_hash   bytea   NOT NULL CHECK (length(leaf_hash) = 32),
    received_s  bigint,
    received_n  integer,
    source      text    NOT NULL,
    seq         bigint  NOT NULL CHECK (seq > 0),
    request_id  text    NOT NULL,
    account_id  text    NOT NULL,
    actor       text    NOT NULL,
    actor_name  text,
    action      text    NOT NULL,
    event_s     bigint,
    event_n     integer,
    UNIQUE (source, seq)
);
CREATE INDEX audit_entries_request ON audit_entries (request_id, idx) WHERE request_id <> '';
CREATE INDEX audit_entries_account ON audit_entries (account_id, idx) WHERE account_id <> '';
CREATE INDEX audit_entries_actor ON audit_entries (actor, idx) WHERE actor <> '';
CREATE INDEX audit_entries_actor_name ON audit_entries (actor_name, idx) WHERE actor_name IS NOT NULL;
CREATE INDEX audit_entries_action ON audit_entries (action, idx) WHERE action <> '';
CREATE INDEX audit_entries_time ON audit_entries (event_s, event_n, idx) WHERE event_s IS NOT NULL;
CREATE TABLE audit_nodes (
    level  integer NOT NULL,
    idx    bigint  NOT NULL,
    hash   bytea   NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (level, idx)
);
CREATE TABLE audit_head (
    one   boolean PRIMARY KEY DEFAULT true CHECK (one),
    size  bigint  NOT NULL CHECK (size > 0),
    root  bytea   NOT NULL CHECK (length(root) = 32),
    note  text    NOT NULL
);
",
}];

/// The sequencer lease: a session advisory lock on this key.
const LEASE: &str = "SELECT pg_try_advisory_lock(hashtext('twokey-audit-sequencer'))";

/// How long a read waits for PostgreSQL before it answers UNAVAILABLE.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`PgLogStore::append`] and a replica without the lease answer.
pub const NOT_SEQUENCER: &str = "this audit replica is not the sequencer; another replica holds \
     the lease (send appends to the next audit address)";

fn pg_error(e: PgError) -> AuditError {
    AuditError::Store(e.to_string())
}

fn from_pg(e: tokio_postgres::Error) -> AuditError {
    pg_error(PgError::from(e))
}

/// What is staged beyond the committed log, and who may append.
#[derive(Debug, Default)]
struct State {
    /// Entries the database holds (as this replica last read or wrote).
    committed: u64,
    /// Entries appended since, in index order, with their leaf hashes.
    staged: Vec<(LogEntry, Hash)>,
    /// Nodes those appends completed.
    nodes: BTreeMap<(u32, u64), Hash>,
    /// Each source's next seq, as the staged entries leave it.
    next_seq: BTreeMap<String, u64>,
    /// Where each staged (source, seq) landed.
    seq_index: BTreeMap<(String, u64), u64>,
    /// Whether this replica holds the lease and appends.
    sequencer: bool,
}

impl State {
    fn clear_staged(&mut self) {
        self.staged.clear();
        self.nodes.clear();
        self.next_seq.clear();
        self.seq_index.clear();
    }
}

/// The log in PostgreSQL; see the module documentation.
#[derive(Debug)]
pub struct PgLogStore {
    settings: PgSettings,
    rt: Arc<StoreRuntime>,
    /// The session reads go through; reconnected when lost.
    reader: Mutex<Option<Arc<Client>>>,
    /// The session holding the lease, when this replica holds it; commits
    /// run on it.
    lease: Arc<tokio::sync::Mutex<Option<Client>>>,
    /// The session that asks for the lease while another replica holds it.
    candidate: Mutex<Option<Client>>,
    state: Mutex<State>,
    /// Bumped whenever staged appends are dropped (the lease lost), so an
    /// append staged before is never acknowledged by a later commit.
    epoch: AtomicU64,
    /// Set once a commit fails: the lease session is given up.
    lost: AtomicBool,
    /// Committed nodes read or written lately: a node never changes once
    /// committed, and signing and proofs read the same right edge again
    /// and again. Emptied when it reaches [`NODE_CACHE`] entries.
    nodes: Mutex<std::collections::HashMap<(u32, u64), Hash>>,
    /// Why the last request for the lease failed (PostgreSQL unreachable),
    /// until one succeeds: what a refused append says instead of naming
    /// another replica.
    unreachable: Mutex<Option<String>>,
}

/// How many committed nodes [`PgLogStore`] keeps in memory at most.
const NODE_CACHE: usize = 1 << 16;

impl PgLogStore {
    /// Connects with `settings`, applies the audit migrations and reads the
    /// committed size. The replica does not append until it takes the
    /// lease ([`PgLogStore::try_lease`]).
    pub async fn open(settings: PgSettings) -> Result<Self, AuditError> {
        let rt = StoreRuntime::new("audit-postgres").map_err(pg_error)?;
        let store = Self {
            settings,
            rt: Arc::new(rt),
            reader: Mutex::new(None),
            lease: Arc::new(tokio::sync::Mutex::new(None)),
            candidate: Mutex::new(None),
            state: Mutex::new(State::default()),
            epoch: AtomicU64::new(0),
            lost: AtomicBool::new(false),
            nodes: Mutex::new(std::collections::HashMap::new()),
            unreachable: Mutex::new(None),
        };
        let settings = store.settings.clone();
        store
            .run(async move {
                let mut client = twokey_pgstore::connect(&settings).await?;
                twokey_pgstore::migrate(&mut client, "audit", MIGRATIONS).await?;
                Ok::<_, PgError>(())
            })
            .await?
            .map_err(pg_error)?;
        let (size, _) = store.load_head().await?;
        store.state().committed = size;
        Ok(store)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `fut` on the store's runtime and waits for it.
    async fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, AuditError> {
        self.rt
            .handle()
            .spawn(fut)
            .await
            .map_err(|e| AuditError::Store(format!("the PostgreSQL task failed: {e}")))
    }

    /// The read session, connected if needed.
    async fn reader(&self) -> Result<Arc<Client>, AuditError> {
        if let Some(c) = self
            .reader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            && !c.is_closed()
        {
            return Ok(c);
        }
        let settings = self.settings.clone();
        let client = Arc::new(
            self.run(async move { twokey_pgstore::connect(&settings).await })
                .await?
                .map_err(pg_error)?,
        );
        *self.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some(client.clone());
        Ok(client)
    }

    /// Runs a read on the read session, blocking the caller (the trait's
    /// reads are synchronous) for at most [`READ_TIMEOUT`].
    fn block<T, F, Fut>(&self, read: F) -> Result<T, AuditError>
    where
        T: Send + 'static,
        F: Fn(Arc<Client>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, tokio_postgres::Error>> + Send,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        let settings = self.settings.clone();
        let cached = self
            .reader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|c| !c.is_closed());
        self.rt.handle().spawn(async move {
            let work = async {
                // A kept session may have died since (its server restarted):
                // then once more on a new one.
                if let Some(c) = cached
                    && let Ok(out) = read(c).await
                {
                    return Ok((out, None));
                }
                let client = Arc::new(twokey_pgstore::connect(&settings).await.map_err(pg_error)?);
                let out = read(client.clone()).await.map_err(from_pg)?;
                Ok::<_, AuditError>((out, Some(client)))
            };
            let answer = match tokio::time::timeout(READ_TIMEOUT, work).await {
                Ok(r) => r,
                Err(_) => Err(AuditError::Store(format!(
                    "PostgreSQL is unavailable: no answer within {READ_TIMEOUT:?}"
                ))),
            };
            let _ = tx.send(answer);
        });
        let (out, fresh) = rx
            .recv()
            .map_err(|_| AuditError::Store("the PostgreSQL task ended".into()))??;
        if let Some(c) = fresh {
            *self.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
        }
        Ok(out)
    }

    /// The committed size and the signed tree head note in the database.
    pub async fn load_head(&self) -> Result<(u64, Option<String>), AuditError> {
        let client = self.reader().await?;
        // One statement, so the head and the count are of one snapshot (a
        // sequencer committing between two would look like an altered
        // table to a follower).
        let row = self
            .run(async move {
                client
                    .query_one(
                        "SELECT (SELECT size FROM audit_head), (SELECT note FROM audit_head),
                                (SELECT coalesce(max(idx) + 1, 0) FROM audit_entries)",
                        &[],
                    )
                    .await
            })
            .await?
            .map_err(from_pg)?;
        let entries: i64 = row.get(2);
        let head = row
            .get::<_, Option<i64>>(0)
            .zip(row.get::<_, Option<String>>(1));
        let size = head.as_ref().map_or(0, |(s, _)| *s);
        if entries != size {
            return Err(AuditError::TreeHead(format!(
                "the database holds {entries} entries but its signed tree head covers {size}: \
                 the tables were altered outside the audit service. Restore the audit database \
                 from a backup"
            )));
        }
        Ok((size as u64, head.map(|(_, n)| n)))
    }

    /// Tries to take the sequencer lease on a new session: true when this
    /// replica now holds it. The caller then loads the log and checks it
    /// ([`crate::service::AuditLog::take_over`]) before appending.
    pub async fn try_lease(&self) -> Result<bool, AuditError> {
        let mut lease = self.lease.clone().lock_owned().await;
        if lease.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(true);
        }
        let candidate = self
            .candidate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .filter(|c| !c.is_closed());
        let settings = self.settings.clone();
        let asked = self
            .run(async move {
                // A kept session may have died since (its server restarted):
                // then once more on a new one.
                if let Some(c) = candidate
                    && let Ok(row) = c.query_one(LEASE, &[]).await
                {
                    return Ok((c, row.get(0)));
                }
                let client = twokey_pgstore::connect(&settings).await?;
                // Every acknowledgement is a commit flushed to disk, whatever
                // the role's or database's default says.
                client.batch_execute("SET synchronous_commit = on").await?;
                let held: bool = client.query_one(LEASE, &[]).await?.get(0);
                Ok::<_, PgError>((client, held))
            })
            .await?
            .map_err(pg_error);
        *self.unreachable.lock().unwrap_or_else(|e| e.into_inner()) =
            asked.as_ref().err().map(ToString::to_string);
        let (client, held) = asked?;
        if held {
            *lease = Some(client);
            self.lost.store(false, Ordering::SeqCst);
        } else {
            // The same session asks again next time.
            *self.candidate.lock().unwrap_or_else(|e| e.into_inner()) = Some(client);
        }
        Ok(held)
    }

    /// Whether this replica's lease session is still alive (a round trip).
    pub async fn lease_alive(&self) -> bool {
        if self.lost.load(Ordering::SeqCst) {
            return false;
        }
        let lease = self.lease.clone();
        self.run(async move {
            let lease = lease.lock().await;
            match lease.as_ref() {
                Some(c) if !c.is_closed() => {
                    tokio::time::timeout(Duration::from_secs(5), c.simple_query("SELECT 1"))
                        .await
                        .is_ok_and(|r| r.is_ok())
                }
                _ => false,
            }
        })
        .await
        .unwrap_or(false)
    }

    /// Gives the lease up (its session is closed): staged appends are
    /// dropped and never acknowledged, and appends are refused until the
    /// lease is taken again.
    pub async fn give_up_lease(&self) {
        {
            let mut state = self.state();
            state.sequencer = false;
            state.clear_staged();
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
        *self.lease.lock().await = None;
    }

    /// Whether this replica holds the lease and appends.
    pub fn is_sequencer(&self) -> bool {
        self.state().sequencer
    }

    /// Starts appending over a log of `size` committed entries, checked by
    /// the caller against the signed head it loaded under the lease.
    pub fn become_sequencer(&self, size: u64) {
        let mut state = self.state();
        state.clear_staged();
        state.committed = size;
        state.sequencer = true;
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// A follower saw the database grow to `size` committed entries.
    pub fn follow(&self, size: u64) {
        let mut state = self.state();
        if !state.sequencer {
            state.committed = state.committed.max(size);
        }
    }

    /// Writes everything staged and `head`, signed over it, in one
    /// transaction on the lease session. On failure the staged appends are
    /// dropped and the lease given up: whether the commit happened is not
    /// known, and the next sequencer reads it back from the database.
    pub async fn commit_group(&self, head: &TreeHead) -> Result<(), AuditError> {
        let (from, group, nodes) = {
            let state = self.state();
            if !state.sequencer {
                return Err(AuditError::Store(NOT_SEQUENCER.into()));
            }
            let end = state.committed + state.staged.len() as u64;
            if head.size < state.committed || head.size > end {
                return Err(AuditError::Store(format!(
                    "a tree head of {} entries for a log of {} committed and {end} staged",
                    head.size, state.committed
                )));
            }
            // The group is what the head covers; later appends stay staged.
            let n = (head.size - state.committed) as usize;
            let nodes: BTreeMap<(u32, u64), Hash> = state
                .nodes
                .iter()
                .filter(|((level, i), _)| (i + 1) << level <= head.size)
                .map(|(k, v)| (*k, *v))
                .collect();
            (state.committed, state.staged[..n].to_vec(), nodes)
        };
        if group.is_empty() {
            return Ok(());
        }
        let rows = Rows::of(&group)?;
        let (levels, node_idx, hashes): (Vec<i32>, Vec<i64>, Vec<Vec<u8>>) = nodes
            .iter()
            .map(|((l, i), h)| (*l as i32, *i as i64, h.to_vec()))
            .fold((vec![], vec![], vec![]), |mut acc, (l, i, h)| {
                acc.0.push(l);
                acc.1.push(i);
                acc.2.push(h);
                acc
            });
        let lease = self.lease.clone();
        let (size, root, note) = (head.size as i64, head.root.to_vec(), head.note.clone());
        let before = from as i64;
        let done = self
            .run(async move {
                let mut lease = lease.lock().await;
                let Some(client) = lease.as_mut() else {
                    return Err(AuditError::Store(NOT_SEQUENCER.into()));
                };
                let tx = client.transaction().await.map_err(from_pg)?;
                tx.execute(
                    "INSERT INTO audit_entries (idx, leaf_data, leaf_hash, received_s, \
                     received_n, source, seq, request_id, account_id, actor, actor_name, action, \
                     event_s, event_n) SELECT * FROM unnest($1::bigint[], $2::bytea[], \
                     $3::bytea[], $4::bigint[], $5::integer[], $6::text[], $7::bigint[], \
                     $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::bigint[], \
                     $14::integer[])",
                    &[
                        &rows.idx,
                        &rows.leaf_data,
                        &rows.leaf_hash,
                        &rows.received_s,
                        &rows.received_n,
                        &rows.source,
                        &rows.seq,
                        &rows.request_id,
                        &rows.account_id,
                        &rows.actor,
                        &rows.actor_name,
                        &rows.action,
                        &rows.event_s,
                        &rows.event_n,
                    ],
                )
                .await
                .map_err(from_pg)?;
                tx.execute(
                    "INSERT INTO audit_nodes (level, idx, hash) \
                     SELECT * FROM unnest($1::integer[], $2::bigint[], $3::bytea[])",
                    &[&levels, &node_idx, &hashes],
                )
                .await
                .map_err(from_pg)?;
                let updated = tx
                    .execute(
                        "INSERT INTO audit_head (one, size, root, note) VALUES (true, $1, $2, $3) \
                         ON CONFLICT (one) DO UPDATE SET size = EXCLUDED.size, \
                         root = EXCLUDED.root, note = EXCLUDED.note \
                         WHERE audit_head.size = $4",
                        &[&size, &root, &note, &before],
                    )
                    .await
                    .map_err(from_pg)?;
                if updated != 1 {
                    return Err(AuditError::TreeHead(format!(
                        "the signed tree head in the database is no longer the one of {before} \
                         entries this sequencer extended: another replica wrote the log"
                    )));
                }
                tx.commit().await.map_err(from_pg)
            })
            .await
            .and_then(|r| r);
        match done {
            Ok(()) => {
                let mut state = self.state();
                let n = group.len();
                state.committed = from + n as u64;
                state.staged.drain(..n);
                // Nodes of later appends stay staged; those committed are
                // read from the cache or the database from now on.
                state.nodes.retain(|k, _| !nodes.contains_key(k));
                self.cache_nodes(nodes.into_iter());
                let committed: Vec<_> = group
                    .iter()
                    .filter_map(|(e, _)| e.event.as_ref().map(|ev| (ev.source.clone(), ev.seq)))
                    .collect();
                for key in committed {
                    state.seq_index.remove(&key);
                }
                // Each source's next seq stays known: only the lease holder
                // writes, and losing the lease clears it.
                Ok(())
            }
            Err(e) => {
                self.lost.store(true, Ordering::SeqCst);
                self.give_up_lease().await;
                Err(e)
            }
        }
    }

    fn db_node(&self, level: u32, index: u64) -> Result<Option<Hash>, AuditError> {
        let row = self.block(move |c| async move {
            c.query_opt(
                "SELECT hash FROM audit_nodes WHERE level = $1 AND idx = $2",
                &[&(level as i32), &(index as i64)],
            )
            .await
        })?;
        row.map(|r| {
            let v: Vec<u8> = r.get(0);
            Hash::try_from(v.as_slice()).map_err(|_| {
                AuditError::Store(format!("tree node {level}/{index} is not 32 bytes"))
            })
        })
        .transpose()
    }

    fn node_in(&self, staged: &State, level: u32, index: u64) -> Result<Hash, AuditError> {
        if let Some(h) = staged.nodes.get(&(level, index)) {
            return Ok(*h);
        }
        if let Some(h) = self.cached().get(&(level, index)) {
            return Ok(*h);
        }
        let h = self
            .db_node(level, index)?
            .ok_or_else(|| AuditError::Store(format!("missing tree node {level}/{index}")))?;
        self.cache_nodes(std::iter::once(((level, index), h)));
        Ok(h)
    }

    fn cached(&self) -> MutexGuard<'_, std::collections::HashMap<(u32, u64), Hash>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cache_nodes(&self, nodes: impl Iterator<Item = ((u32, u64), Hash)>) {
        let mut cache = self.cached();
        for (k, h) in nodes {
            if cache.len() >= NODE_CACHE {
                cache.clear();
            }
            cache.insert(k, h);
        }
    }

    /// The epoch of staged appends (see [`LogStore::epoch`]).
    fn current_epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }
}

/// A group as column arrays, for one `INSERT … SELECT FROM unnest`.
struct Rows {
    idx: Vec<i64>,
    leaf_data: Vec<Vec<u8>>,
    leaf_hash: Vec<Vec<u8>>,
    received_s: Vec<Option<i64>>,
    received_n: Vec<Option<i32>>,
    source: Vec<String>,
    seq: Vec<i64>,
    request_id: Vec<String>,
    account_id: Vec<String>,
    actor: Vec<String>,
    actor_name: Vec<Option<String>>,
    action: Vec<String>,
    event_s: Vec<Option<i64>>,
    event_n: Vec<Option<i32>>,
}

impl Rows {
    fn of(group: &[(LogEntry, Hash)]) -> Result<Self, AuditError> {
        let mut r = Rows {
            idx: vec![],
            leaf_data: vec![],
            leaf_hash: vec![],
            received_s: vec![],
            received_n: vec![],
            source: vec![],
            seq: vec![],
            request_id: vec![],
            account_id: vec![],
            actor: vec![],
            actor_name: vec![],
            action: vec![],
            event_s: vec![],
            event_n: vec![],
        };
        for (entry, leaf) in group {
            let (Some(signed), Some(event)) = (&entry.signed_event, &entry.event) else {
                return Err(AuditError::Store("entry without an event".into()));
            };
            r.idx.push(entry.index as i64);
            r.leaf_data.push(signed.encode_to_vec());
            r.leaf_hash.push(leaf.to_vec());
            r.received_s
                .push(entry.received_at.as_ref().map(|t| t.seconds));
            r.received_n
                .push(entry.received_at.as_ref().map(|t| t.nanos));
            r.source.push(event.source.clone());
            r.seq.push(event.seq as i64);
            r.request_id.push(event.request_id.clone());
            r.account_id.push(event.account_id.clone());
            r.actor.push(event.actor.clone());
            r.actor_name
                .push(super::index::actor_name(&event.actor).map(str::to_owned));
            r.action.push(event.action.clone());
            r.event_s.push(event.time.as_ref().map(|t| t.seconds));
            r.event_n.push(event.time.as_ref().map(|t| t.nanos));
        }
        Ok(r)
    }
}

/// How many indices a walk fetches per round trip.
const WALK_PAGE: i64 = 256;

impl LogStore for PgLogStore {
    fn size(&self) -> u64 {
        let state = self.state();
        state.committed + state.staged.len() as u64
    }

    fn next_seq(&self, source: &str) -> Result<u64, AuditError> {
        if let Some(n) = self.state().next_seq.get(source) {
            return Ok(*n);
        }
        let source = source.to_owned();
        let row = self.block(move |c| {
            let source = source.clone();
            async move {
                c.query_one(
                    "SELECT coalesce(max(seq), 0) FROM audit_entries WHERE source = $1",
                    &[&source],
                )
                .await
            }
        })?;
        Ok(row.get::<_, i64>(0) as u64 + 1)
    }

    fn index_of(&self, source: &str, seq: u64) -> Result<Option<u64>, AuditError> {
        if let Some(i) = self.state().seq_index.get(&(source.to_owned(), seq)) {
            return Ok(Some(*i));
        }
        let source = source.to_owned();
        let row = self.block(move |c| {
            let source = source.clone();
            async move {
                c.query_opt(
                    "SELECT idx FROM audit_entries WHERE source = $1 AND seq = $2",
                    &[&source, &(seq as i64)],
                )
                .await
            }
        })?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u64))
    }

    fn entry(&self, index: u64) -> Result<Option<LogEntry>, AuditError> {
        {
            let state = self.state();
            if index >= state.committed {
                let at = (index - state.committed) as usize;
                return Ok(state.staged.get(at).map(|(e, _)| e.clone()));
            }
        }
        let row = self.block(move |c| async move {
            c.query_opt(
                "SELECT leaf_data, leaf_hash, received_s, received_n FROM audit_entries \
                 WHERE idx = $1",
                &[&(index as i64)],
            )
            .await
        })?;
        let Some(row) = row else {
            return Ok(None);
        };
        let corrupt = |why: String| AuditError::Corrupt { index, why };
        let data: Vec<u8> = row.get(0);
        let leaf: Vec<u8> = row.get(1);
        if leaf_hash(&data).as_slice() != leaf.as_slice() {
            return Err(corrupt(
                "the entry does not hash to its stored leaf hash".into(),
            ));
        }
        let signed = SignedEvent::decode(data.as_slice()).map_err(|e| corrupt(e.to_string()))?;
        let event = Event::decode(signed.event.as_slice()).map_err(|e| corrupt(e.to_string()))?;
        let received_at = match (row.get::<_, Option<i64>>(2), row.get::<_, Option<i32>>(3)) {
            (Some(seconds), Some(nanos)) => Some(Timestamp { seconds, nanos }),
            _ => None,
        };
        Ok(Some(LogEntry {
            index,
            signed_event: Some(signed),
            event: Some(event),
            received_at,
        }))
    }

    fn append(&self, entry: &LogEntry, leaf: &Hash) -> Result<(), AuditError> {
        let mut state = self.state();
        if !state.sequencer {
            return Err(AuditError::NotSequencer(NOT_SEQUENCER.into()));
        }
        let index = state.committed + state.staged.len() as u64;
        if entry.index != index {
            return Err(AuditError::Store(format!(
                "entry index {} is not the next index {index}",
                entry.index
            )));
        }
        let event = entry
            .event
            .as_ref()
            .ok_or_else(|| AuditError::Store("entry without an event".into()))?;
        let mut nodes = vec![((0u32, index), *leaf)];
        let (mut level, mut i, mut hash) = (0u32, index, *leaf);
        while i & 1 == 1 {
            let left = self.node_in(&state, level, i - 1)?;
            hash = node_hash(&left, &hash);
            level += 1;
            i >>= 1;
            nodes.push(((level, i), hash));
        }
        state.nodes.extend(nodes);
        state.next_seq.insert(event.source.clone(), event.seq + 1);
        state
            .seq_index
            .insert((event.source.clone(), event.seq), index);
        state.staged.push((entry.clone(), *leaf));
        Ok(())
    }

    fn node(&self, level: u32, index: u64) -> Result<Hash, AuditError> {
        let state = self.state();
        self.node_in(&state, level, index)
    }

    async fn sync(&self) -> Result<(), AuditError> {
        // Entries reach the database only with their tree head
        // (commit_group); there is nothing else to make durable.
        if self.state().staged.is_empty() {
            Ok(())
        } else {
            Err(AuditError::Store(
                "entries in PostgreSQL are committed with their signed tree head only".into(),
            ))
        }
    }

    fn discard_uncommitted(&self) -> Result<(), AuditError> {
        self.state().clear_staged();
        Ok(())
    }

    fn keeps_head(&self) -> bool {
        true
    }

    fn appends(&self) -> bool {
        self.is_sequencer()
    }

    fn epoch(&self) -> u64 {
        self.current_epoch()
    }

    fn may_append(&self) -> Result<(), AuditError> {
        if self.state().sequencer {
            return Ok(());
        }
        match &*self.unreachable.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(why) => Err(AuditError::NotSequencer(format!(
                "this audit replica cannot append: it cannot reach its database to take the \
                 sequencer lease ({why}); retry, or send to the next audit address"
            ))),
            None => Err(AuditError::NotSequencer(NOT_SEQUENCER.into())),
        }
    }

    async fn commit_with_head(&self, head: &TreeHead) -> Result<(), AuditError> {
        self.commit_group(head).await
    }

    fn walk(
        &self,
        walk: &Walk,
        start: Option<u64>,
        newest_first: bool,
        size: u64,
    ) -> Result<Box<dyn Iterator<Item = Result<u64, AuditError>> + Send + '_>, AuditError> {
        let (column, value) = match walk {
            Walk::All => return Ok(by_index(start, newest_first, size)),
            Walk::Source(v) => ("source", v.clone()),
            Walk::Request(v) => ("request_id", v.clone()),
            Walk::Account(v) => ("account_id", v.clone()),
            Walk::Actor(v) => ("actor", v.clone()),
            Walk::ActorName(v) => ("actor_name", v.clone()),
            Walk::Action(v) => ("action", v.clone()),
            Walk::Time { since, until } => {
                return self.walk_time(*since, *until, start, newest_first);
            }
        };
        let (cmp, order) = if newest_first {
            ("<=", "DESC")
        } else {
            (">=", "ASC")
        };
        let sql = format!(
            "SELECT idx FROM audit_entries WHERE {column} = $1 AND idx {cmp} $2 \
             ORDER BY idx {order} LIMIT {WALK_PAGE}"
        );
        let first = match (start, newest_first) {
            (Some(s), _) => s as i64,
            (None, false) => 0,
            (None, true) => i64::MAX,
        };
        let pages = Pages {
            next: Some(first),
            buffered: Vec::new().into_iter(),
        };
        Ok(Box::new(PagedWalk {
            store: self,
            pages,
            fetch: Box::new(move |store: &PgLogStore, from: i64| {
                let (sql, value) = (sql.clone(), value.clone());
                let rows = store.block(move |c| {
                    let (sql, value) = (sql.clone(), value.clone());
                    async move { c.query(sql.as_str(), &[&value, &from]).await }
                })?;
                Ok(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
            }),
            step: if newest_first { -1 } else { 1 },
            time: false,
        }))
    }
}

impl PgLogStore {
    /// Entries with an event time in `[since, until)`, by time then index,
    /// from the entry at `start` on.
    fn walk_time(
        &self,
        since: Option<(i64, i32)>,
        until: Option<(i64, i32)>,
        start: Option<u64>,
        newest_first: bool,
    ) -> Result<Box<dyn Iterator<Item = Result<u64, AuditError>> + Send + '_>, AuditError> {
        let from = match start {
            Some(index) => {
                let time = self
                    .entry(index)?
                    .and_then(|e| e.event)
                    .and_then(|e| e.time)
                    .map(|t| (t.seconds, t.nanos));
                match time {
                    Some(t) => Some((t, index as i64)),
                    None => return Ok(Box::new(std::iter::empty())),
                }
            }
            None => None,
        };
        let (cmp, order) = if newest_first {
            ("<", "DESC")
        } else {
            (">", "ASC")
        };
        let since = since.unwrap_or((i64::MIN, i32::MIN));
        let until = until.unwrap_or((i64::MAX, i32::MAX));
        // The first page starts at the token's entry, the next ones strictly
        // after the last row of the page before.
        let sql = |cmp: &str| {
            format!(
                "SELECT idx, event_s, event_n FROM audit_entries WHERE event_s IS NOT NULL \
                 AND (event_s, event_n) >= ($1, $2) AND (event_s, event_n) < ($3, $4) \
                 AND (event_s, event_n, idx) {cmp} ($5, $6, $7) \
                 ORDER BY event_s {order}, event_n {order}, idx {order} LIMIT {WALK_PAGE}"
            )
        };
        let (first_sql, next_sql) = (sql(&format!("{cmp}=")), sql(cmp));
        let first = from.unwrap_or(if newest_first {
            ((i64::MAX, i32::MAX), i64::MAX)
        } else {
            ((i64::MIN, i32::MIN), i64::MIN)
        });
        let cursor = Arc::new(Mutex::new((first, false)));
        Ok(Box::new(PagedWalk {
            store: self,
            pages: Pages {
                next: Some(0),
                buffered: Vec::new().into_iter(),
            },
            fetch: Box::new(move |store: &PgLogStore, _| {
                let (((s, n), i), later) = *cursor.lock().unwrap_or_else(|e| e.into_inner());
                let sql = if later {
                    next_sql.clone()
                } else {
                    first_sql.clone()
                };
                let rows = store.block(move |c| {
                    let sql = sql.clone();
                    async move {
                        c.query(
                            sql.as_str(),
                            &[&since.0, &since.1, &until.0, &until.1, &s, &n, &i],
                        )
                        .await
                    }
                })?;
                let mut out = Vec::with_capacity(rows.len());
                for r in &rows {
                    let idx: i64 = r.get(0);
                    out.push(idx);
                    // The next page starts strictly after the last row.
                    *cursor.lock().unwrap_or_else(|e| e.into_inner()) =
                        (((r.get(1), r.get(2)), idx), true);
                }
                Ok(out)
            }),
            step: 0,
            time: true,
        }))
    }
}

type Fetch = Box<dyn Fn(&PgLogStore, i64) -> Result<Vec<i64>, AuditError> + Send>;

struct Pages {
    next: Option<i64>,
    buffered: std::vec::IntoIter<i64>,
}

/// Indices fetched a page at a time.
struct PagedWalk<'a> {
    store: &'a PgLogStore,
    pages: Pages,
    fetch: Fetch,
    /// +1 or -1: where the next page of an index walk starts after the
    /// last index; unused for time walks, which keep their own cursor.
    step: i64,
    time: bool,
}

impl Iterator for PagedWalk<'_> {
    type Item = Result<u64, AuditError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(i) = self.pages.buffered.next() {
            return Some(Ok(i as u64));
        }
        let from = self.pages.next?;
        let page = match (self.fetch)(self.store, from) {
            Ok(p) => p,
            Err(e) => {
                self.pages.next = None;
                return Some(Err(e));
            }
        };
        self.pages.next = if (page.len() as i64) < WALK_PAGE {
            None
        } else if self.time {
            Some(0)
        } else {
            page.last().map(|l| l + self.step)
        };
        self.pages.buffered = page.into_iter();
        self.pages.buffered.next().map(|i| Ok(i as u64))
    }
}

#[cfg(test)]
mod tests;
