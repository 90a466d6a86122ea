//! The log on disk as C2SP `tlog-tiles`: `<data dir>/log/tile/<L>/<N>[.p/<W>]`
//! hash tiles and `<data dir>/log/tile/entries/<N>[.p/<W>]` entry bundles,
//! whose entries are the Merkle leaf data (the encoded `SignedEvent`), so any
//! tile client recomputes the log's roots. sled keeps only indexes: each
//! source's next sequence number and where each (source, seq) landed, the
//! time each entry was received, the query indexes ([`super::index`]) and
//! the committed size.
//!
//! Appends are staged in memory (readers see them). [`LogStore::sync`]
//! writes the tiles they completed and the new partial tiles (temporary
//! file, `fsync`, `rename`, `fsync` of the directory), then the sled batch
//! with the new size, then syncs sled: the size in sled is the commit point,
//! and tiles beyond it (a crash between the two) are removed at the next
//! open. Partial tiles of a tile that is now full are removed after the
//! sync (C2SP allows it). Opening reads the size and the right edge: the
//! partial tiles, and the last full tile of each level, checked against
//! each other; it costs the same at any size.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use prost::Message;
use twokey_proto::{
    Timestamp,
    audit::v1::{Event, LogEntry, SignedEvent},
};
use twokey_runtime::{durable::DurableDb, start::StartError};
use twokey_tlog::tile::{self, Kind, Tile, WIDTH};

use super::{LogStore, SEQ_INDEX, StoreProblem, index, next_seq_key, read_u64, seq_index_key};
use crate::{
    error::AuditError,
    merkle::{Hash, leaf_hash},
};

/// The directory of the tiles and the checkpoint, in the data directory.
pub const LOG_DIR: &str = "log";

const SIZE: &[u8] = b"m/size";
const INDEXED: &[u8] = b"m/indexed";

/// Entries whose query index keys are written to sled together. Keys of
/// one value sort together, so each batch dirties a page per distinct
/// value (actor, account, action); sled rewrites a dirty page at its next
/// flush, which for batches of one group commit cost about 1.8 KB of disk
/// per entry (measured at 10^5 entries). The keys of the entries not yet
/// written are held in memory, walked with the stored ones, and derived
/// again from the tiles at open: an index is not evidence, the tiles are.
pub const QUERY_BATCH: u64 = 8192;
/// Entries indexed per sled batch by [`TileStore::rebuild`]: sled copies
/// a node on every insert and frees the old copies later, so one batch per
/// [`QUERY_BATCH`] held 650 MiB when rebuilding 10^5 entries, one per 512
/// 176 MiB (measured).
const REBUILD_CHUNK: u64 = 512;
const RECEIVED: u8 = b'r';

/// Bytes of full tiles kept in memory for reads.
const CACHE_BYTES: usize = 16 << 20;

/// sled's page cache for the audit's database. sled holds only indexes
/// here; with sled's default (1 GiB) the pages read by queries stay cached
/// up to that size: walking every index key of a log of 10^6 entries took
/// the process to 1,244 MiB, with 32 MiB to 511 MiB (measured), against
/// 256 MiB after load as the target (issue 17). The RSS right after open
/// (about 340 MiB at 10^6) is sled's recovery state and does not depend on
/// this. 32 MiB plus the tiles' [`CACHE_BYTES`] leave room for the rest.
pub const SLED_CACHE_BYTES: u64 = 32 << 20;

fn received_key(index: u64) -> Vec<u8> {
    let mut k = vec![RECEIVED];
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// A tile's content, parsed.
#[derive(Debug, Clone)]
enum Content {
    Hashes(Vec<Hash>),
    Entries(Vec<Vec<u8>>),
}

impl Content {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Content::Hashes(h) => tile::hash_tile_bytes(h),
            Content::Entries(entries) => {
                let mut b = Vec::with_capacity(entries.iter().map(|e| e.len() + 2).sum());
                for e in entries {
                    // Checked at append.
                    let _ = tile::push_entry(&mut b, e);
                }
                b
            }
        }
    }

    fn cost(&self) -> usize {
        match self {
            Content::Hashes(h) => h.len() * 32,
            Content::Entries(e) => e.iter().map(|e| e.len() + 24).sum(),
        }
    }
}

/// Full tiles read from disk, least recently used dropped first.
#[derive(Debug, Default)]
struct Cache {
    tiles: HashMap<(Kind, u64), (Arc<Content>, u64)>,
    tick: u64,
    bytes: usize,
}

impl Cache {
    fn get(&mut self, key: (Kind, u64)) -> Option<Arc<Content>> {
        self.tick += 1;
        let tick = self.tick;
        self.tiles.get_mut(&key).map(|(c, t)| {
            *t = tick;
            c.clone()
        })
    }

    fn put(&mut self, key: (Kind, u64), content: Arc<Content>) {
        self.tick += 1;
        self.bytes += content.cost();
        if let Some((old, _)) = self.tiles.insert(key, (content, self.tick)) {
            self.bytes -= old.cost();
        }
        while self.bytes > CACHE_BYTES && self.tiles.len() > 1 {
            let Some(oldest) = self
                .tiles
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some((c, _)) = self.tiles.remove(&oldest) {
                self.bytes -= c.cost();
            }
        }
    }
}

/// What appends changed since the last sync, and the right edge.
#[derive(Debug)]
struct State {
    /// The partial hash tile of each tile level (possibly empty).
    partial: Vec<Arc<Content>>,
    /// The entries of the partial bundle.
    entries: Arc<Content>,
    /// The partial tiles last written, so an unchanged one is not written
    /// again.
    written: HashMap<Kind, (u64, u16)>,
    /// Full tiles completed and not yet on disk.
    unsynced: BTreeMap<(Kind, u64), Arc<Content>>,
    /// sled writes staged: the metadata tree.
    staged: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Query index keys not written to sled yet ([`QUERY_BATCH`]).
    pending_query: BTreeSet<Vec<u8>>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            partial: Vec::new(),
            entries: Arc::new(Content::Entries(Vec::new())),
            written: HashMap::new(),
            unsynced: BTreeMap::new(),
            staged: BTreeMap::new(),
            pending_query: BTreeSet::new(),
        }
    }
}

fn hashes_mut(c: &mut Arc<Content>) -> &mut Vec<Hash> {
    match Arc::make_mut(c) {
        Content::Hashes(h) => h,
        Content::Entries(_) => unreachable!("a hash tile"),
    }
}

fn entries_mut(c: &mut Arc<Content>) -> &mut Vec<Vec<u8>> {
    match Arc::make_mut(c) {
        Content::Entries(e) => e,
        Content::Hashes(_) => unreachable!("an entry bundle"),
    }
}

#[derive(Debug)]
struct Inner {
    /// `<data dir>/log`.
    dir: PathBuf,
    db: DurableDb,
    meta: sled::Tree,
    query: sled::Tree,
    /// Entries written, durable or staged.
    size: AtomicU64,
    /// Entries committed (tiles and index durable).
    committed: AtomicU64,
    /// Entries whose query index keys are in sled.
    indexed: AtomicU64,
    state: Mutex<State>,
    cache: Mutex<Cache>,
    /// What the open found wrong with the right edge, if anything.
    problem: Mutex<Option<StoreProblem>>,
    /// Syncs run one at a time.
    sync: Mutex<()>,
}

/// The log in C2SP tiles under `<data dir>/log`, indexed in sled.
#[derive(Debug, Clone)]
pub struct TileStore {
    inner: Arc<Inner>,
}

impl TileStore {
    /// Opens (creating if needed) the log in `data_dir`. An old log kept
    /// in sled (the `audit_log` tree of earlier versions) is not moved
    /// here: [`super::migrate::migrate`] does that, checked against the
    /// signed tree head.
    pub fn open(data_dir: &Path) -> Result<Self, StartError> {
        let db = DurableDb::open_with_cache(data_dir, SLED_CACHE_BYTES)?;
        Self::with_db(db).map_err(|e| {
            StartError::refused(format!(
                "cannot open the audit log in {}: {e}",
                data_dir.display()
            ))
        })
    }

    /// The log in an already open database (no migration).
    pub fn with_db(db: DurableDb) -> Result<Self, AuditError> {
        let dir = db.path().join(LOG_DIR);
        fs::create_dir_all(&dir).map_err(|e| io(&dir, "create", e))?;
        let meta = db.tree("log_meta")?;
        let query = db.tree("log_query")?;
        let size = match meta.get(SIZE)? {
            Some(v) => read_u64(&v, "log size")?,
            None => 0,
        };
        let indexed = match meta.get(INDEXED)? {
            Some(v) => read_u64(&v, "indexed size")?.min(size),
            None => 0,
        };
        let (state, problem) = match load_edge(&dir, size) {
            Ok(state) => (state, None),
            Err(why) => (
                State::default(),
                Some(StoreProblem {
                    held: held_size(&dir, size),
                    why,
                }),
            ),
        };
        let store = Self {
            inner: Arc::new(Inner {
                dir,
                db,
                meta,
                query,
                size: AtomicU64::new(size),
                committed: AtomicU64::new(size),
                indexed: AtomicU64::new(indexed),
                state: Mutex::new(state),
                cache: Mutex::new(Cache::default()),
                problem: Mutex::new(problem),
                sync: Mutex::new(()),
            }),
        };
        let mut problem = store
            .inner
            .problem
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if problem.is_none()
            && let Err(why) = store.check_edge(size)
        {
            *problem = Some(StoreProblem { held: None, why });
        }
        let whole = problem.is_none();
        drop(problem);
        if whole {
            // The query keys of the entries not yet indexed in sled.
            for index in indexed..size {
                let event = store
                    .entry(index)?
                    .and_then(|e| e.event)
                    .ok_or_else(|| AuditError::Store(format!("entry {index} is missing")))?;
                store
                    .state()
                    .pending_query
                    .extend(index::keys(&event, index));
            }
        }
        Ok(store)
    }

    /// `<data dir>/log`: the tiles, and the checkpoint next to them.
    pub fn log_dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The sled database (migration, tests).
    pub fn db(&self) -> &DurableDb {
        &self.inner.db
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, AuditError> {
        if let Some(v) = self.state().staged.get(key) {
            return Ok(Some(v.clone()));
        }
        Ok(self.inner.meta.get(key)?.map(|v| v.to_vec()))
    }

    /// Tile `index` of `kind`: the partial or unsynced one in memory, else
    /// the full tile from the cache or the disk.
    fn tile(&self, kind: Kind, index: u64) -> Result<Arc<Content>, AuditError> {
        {
            let state = self.state();
            let size = self.inner.size.load(Ordering::SeqCst);
            let level = match kind {
                Kind::Hashes(l) => l,
                Kind::Entries => 0,
            };
            if index == tile::hashes_at(level, size) / WIDTH {
                return Ok(match kind {
                    Kind::Hashes(l) => state
                        .partial
                        .get(usize::from(l))
                        .cloned()
                        .unwrap_or_else(|| Arc::new(Content::Hashes(Vec::new()))),
                    Kind::Entries => state.entries.clone(),
                });
            }
            if let Some(c) = state.unsynced.get(&(kind, index)) {
                return Ok(c.clone());
            }
        }
        let cache = || self.inner.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache().get((kind, index)) {
            return Ok(c);
        }
        let t = Tile {
            kind,
            index,
            width: WIDTH as u16,
        };
        let content = Arc::new(read_tile(&self.inner.dir, &t)?);
        cache().put((kind, index), content.clone());
        Ok(content)
    }

    /// For a walk of `source`'s entries from leaf index `index`: the first
    /// seq stored at or after it (oldest first; past the last when none is),
    /// or the last stored at or before it (newest first; 0 when none is).
    fn seq_near(&self, source: &str, index: u64, newest_first: bool) -> Result<u64, AuditError> {
        // Seqs 1..next are stored, at increasing indices.
        let (mut lo, mut hi) = (1u64, self.next_seq(source)?);
        // The first seq in [lo, hi) whose index is above (or at) `index`.
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let at = self
                .index_of(source, mid)?
                .ok_or_else(|| AuditError::Store(format!("no index for {source} seq {mid}")))?;
            let after = if newest_first {
                at > index
            } else {
                at >= index
            };
            if after {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(if newest_first { lo - 1 } else { lo })
    }

    /// The leaf hash of entry `index` as its level-0 tile holds it.
    fn leaf(&self, index: u64) -> Result<Hash, AuditError> {
        self.node(0, index)
    }

    /// Checks the right edge of a log of `size`: the partial bundle and the
    /// last full bundle hash to their level-0 tiles, and the last full
    /// tile of each level hashes to its place in the level above.
    fn check_edge(&self, size: u64) -> Result<(), String> {
        let dir = self.inner.dir.display();
        // The partial bundle and the last full one.
        let first = (size - size % WIDTH).saturating_sub(WIDTH);
        for index in first..size {
            let bytes = self.entry_bytes(index).map_err(|e| {
                format!("entry {index} stored in {dir} cannot be read ({e}): it was altered")
            })?;
            let stored = self
                .leaf(index)
                .map_err(|e| format!("the leaf hash of entry {index} stored in {dir} cannot be read ({e}): it was altered"))?;
            if leaf_hash(&bytes) != stored {
                return Err(format!(
                    "entry {index} stored in {dir} does not hash to its leaf hash in its level-0 \
                     tile: it was altered"
                ));
            }
        }
        for level in 0..tile::levels(size) {
            let (full, _) = tile::edge(Kind::Hashes(level), size);
            let Some(full) = full else { continue };
            let hashes = match &*self
                .tile(full.kind, full.index)
                .map_err(|e| e.to_string())?
            {
                Content::Hashes(h) => tile::subtree_of(h).map_err(|e| e.to_string())?,
                Content::Entries(_) => unreachable!("a hash tile"),
            };
            let above = self
                .node(tile::HEIGHT * (u32::from(level) + 1), full.index)
                .map_err(|e| e.to_string())?;
            if hashes != above {
                return Err(format!(
                    "tile {} stored in {dir} does not hash to its place in level {}: it was altered",
                    full.path(),
                    level + 1
                ));
            }
        }
        Ok(())
    }

    /// The leaf data of entry `index`.
    fn entry_bytes(&self, index: u64) -> Result<Vec<u8>, AuditError> {
        match &*self.tile(Kind::Entries, index / WIDTH)? {
            Content::Entries(entries) => entries
                .get((index % WIDTH) as usize)
                .cloned()
                .ok_or_else(|| AuditError::Store(format!("entry {index} is not in its bundle"))),
            Content::Hashes(_) => unreachable!("an entry bundle"),
        }
    }

    /// Rehashes every stored entry and tile and checks each against the
    /// level above: what opening does not do (it checks the right edge
    /// only). Returns the root of the whole log.
    pub fn verify_all(&self) -> Result<Hash, AuditError> {
        let size = self.inner.size.load(Ordering::SeqCst);
        for index in 0..size {
            let bytes = self.entry_bytes(index)?;
            if leaf_hash(&bytes) != self.leaf(index)? {
                return Err(AuditError::Corrupt {
                    index,
                    why: "the entry does not hash to its leaf hash in its level-0 tile".into(),
                });
            }
        }
        for level in 0..tile::levels(size) {
            let count = tile::hashes_at(level, size) / WIDTH;
            for n in 0..count {
                let h = match &*self.tile(Kind::Hashes(level), n)? {
                    Content::Hashes(h) => {
                        tile::subtree_of(h).map_err(|e| AuditError::Store(e.to_string()))?
                    }
                    Content::Entries(_) => unreachable!("a hash tile"),
                };
                if h != self.node(tile::HEIGHT * (u32::from(level) + 1), n)? {
                    return Err(AuditError::Store(format!(
                        "tile {} does not hash to its place in level {}",
                        Tile {
                            kind: Kind::Hashes(level),
                            index: n,
                            width: WIDTH as u16
                        }
                        .path(),
                        level + 1
                    )));
                }
            }
        }
        crate::merkle::subtree_root(0, size, &mut |l, i| self.node(l, i))
    }

    /// Rebuilds sled's indexes from the tiles when sled holds none (its
    /// files were lost or moved away), only if the tiles give `root` at
    /// `signed` entries (the signed checkpoint's): the tiles are read up to
    /// the most entries they hold (the checkpoint may lag behind the last
    /// group commits, whose partial tiles of its size are gone once full),
    /// else up to `signed`; the right edge is checked as at open, every
    /// entry against its leaf hash, each source's sequence numbers must
    /// follow on from 1, and the size is committed last. Received times
    /// were kept in sled alone: rebuilt entries have none. On any mismatch
    /// nothing is committed and the store stays empty. Returns the size.
    pub fn rebuild(&self, signed: u64, root: Hash) -> Result<u64, AuditError> {
        let _one = self.inner.sync.lock().unwrap_or_else(|e| e.into_inner());
        if self.size() != 0 || self.inner.meta.get(SIZE)?.is_some() {
            return Err(AuditError::Store(
                "the index is not empty: only an empty one is rebuilt from the tiles".into(),
            ));
        }
        let held = held_from(&self.inner.dir, signed);
        let mut first = None;
        for size in [held, signed] {
            if size < signed || (first.is_some() && size == held) {
                continue;
            }
            match self.rebuild_at(size, signed, root) {
                Ok(()) => return Ok(size),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        Err(first.unwrap_or_else(|| {
            AuditError::Store(format!(
                "the tiles hold {held} entries, fewer than the {signed} signed"
            ))
        }))
    }

    fn rebuild_at(&self, size: u64, signed: u64, root: Hash) -> Result<(), AuditError> {
        let result = load_edge(&self.inner.dir, size)
            .map_err(AuditError::Store)
            .and_then(|state| {
                *self.state() = state;
                self.inner.size.store(size, Ordering::SeqCst);
                self.reindex(size, signed, root)
            });
        match result {
            Ok(()) => {
                self.inner.db.sync_blocking()?;
                self.inner.committed.store(size, Ordering::SeqCst);
                self.inner.indexed.store(size, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                // What was written of the index goes too: an empty store
                // holds no keys.
                self.inner.meta.clear()?;
                self.inner.query.clear()?;
                *self.state() = State::default();
                self.inner.size.store(0, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// [`TileStore::rebuild`] once the right edge of `size` is loaded.
    fn reindex(&self, size: u64, signed: u64, root: Hash) -> Result<(), AuditError> {
        self.check_edge(size).map_err(AuditError::Store)?;
        let got = crate::merkle::subtree_root(0, signed, &mut |l, i| self.node(l, i))?;
        if got != root {
            return Err(AuditError::Store(format!(
                "the tiles give the root {} at {signed} entries, not the checkpoint's {}",
                hex::encode(got),
                hex::encode(root)
            )));
        }
        let mut next: HashMap<String, u64> = HashMap::new();
        let (mut meta, mut query) = (sled::Batch::default(), sled::Batch::default());
        for index in 0..size {
            let event = self
                .entry(index)?
                .and_then(|e| e.event)
                .ok_or_else(|| AuditError::Store(format!("entry {index} is missing")))?;
            let expected = next.get(&event.source).copied().unwrap_or(1);
            if event.seq != expected {
                return Err(AuditError::Store(format!(
                    "entry {index} is seq {} of {}, which should be seq {expected}",
                    event.seq, event.source
                )));
            }
            meta.insert(
                seq_index_key(&event.source, event.seq),
                &index.to_be_bytes(),
            );
            for k in index::keys(&event, index) {
                query.insert(k, &[]);
            }
            next.insert(event.source, expected + 1);
            if (index + 1) % REBUILD_CHUNK == 0 {
                self.inner.query.apply_batch(std::mem::take(&mut query))?;
                self.inner.meta.apply_batch(std::mem::take(&mut meta))?;
            }
        }
        self.inner.query.apply_batch(query)?;
        for (source, seq) in &next {
            meta.insert(next_seq_key(source), &seq.to_be_bytes());
        }
        meta.insert(INDEXED, &size.to_be_bytes());
        // The commit point, last.
        meta.insert(SIZE, &size.to_be_bytes());
        self.inner.meta.apply_batch(meta)?;
        Ok(())
    }

    /// Writes what is staged: tiles, then the sled batch; blocking.
    pub(crate) fn sync_blocking(&self) -> Result<(), AuditError> {
        let _one = self.inner.sync.lock().unwrap_or_else(|e| e.into_inner());
        // A snapshot of everything staged, taken at one size.
        let (target, files, meta) = {
            let state = self.state();
            let target = self.inner.size.load(Ordering::SeqCst);
            if target == self.inner.committed.load(Ordering::SeqCst) && state.staged.is_empty() {
                return Ok(());
            }
            let mut files: Vec<(Tile, Vec<u8>)> = state
                .unsynced
                .iter()
                .map(|((kind, index), c)| {
                    (
                        Tile {
                            kind: *kind,
                            index: *index,
                            width: WIDTH as u16,
                        },
                        c.bytes(),
                    )
                })
                .collect();
            let edge = (0..tile::levels(target))
                .map(|level| {
                    (
                        tile::edge(Kind::Hashes(level), target).1,
                        &state.partial[usize::from(level)],
                    )
                })
                .chain([(tile::edge(Kind::Entries, target).1, &state.entries)]);
            for (t, content) in edge {
                if let Some(t) = t
                    && state.written.get(&t.kind) != Some(&(t.index, t.width))
                {
                    files.push((t, content.bytes()));
                }
            }
            (target, files, state.staged.clone())
        };
        // A tile that cannot be written fails the sync like sled's own
        // sync: in the service, tried once more, then the process stops.
        twokey_runtime::durable::fail_stop(&self.inner.dir, || {
            write_tiles(&self.inner.dir, &files)
        })?;
        {
            let mut state = self.state();
            let mut batch = sled::Batch::default();
            for (k, v) in &meta {
                batch.insert(k.as_slice(), v.as_slice());
            }
            batch.insert(SIZE, &target.to_be_bytes());
            if target - self.inner.indexed.load(Ordering::SeqCst) >= QUERY_BATCH {
                // The query keys of the entries up to `target`, before the
                // size they are indexed to.
                let keys: Vec<Vec<u8>> = state
                    .pending_query
                    .iter()
                    .filter(|k| index::index_of_key(k).is_ok_and(|i| i < target))
                    .cloned()
                    .collect();
                let mut query = sled::Batch::default();
                for k in &keys {
                    query.insert(k.as_slice(), &[]);
                }
                self.inner.query.apply_batch(query)?;
                for k in &keys {
                    state.pending_query.remove(k);
                }
                batch.insert(INDEXED, &target.to_be_bytes());
                self.inner.indexed.store(target, Ordering::SeqCst);
            }
            self.inner.meta.apply_batch(batch)?;
            for (k, v) in &meta {
                if state.staged.get(k) == Some(v) {
                    state.staged.remove(k);
                }
            }
            for (t, _) in files.iter().filter(|(t, _)| !t.is_full()) {
                state.written.insert(t.kind, (t.index, t.width));
            }
            let mut cache = self.inner.cache.lock().unwrap_or_else(|e| e.into_inner());
            for (t, _) in files.iter().filter(|(t, _)| t.is_full()) {
                if let Some(c) = state.unsynced.remove(&(t.kind, t.index)) {
                    cache.put((t.kind, t.index), c);
                }
            }
        }
        self.inner.db.sync_blocking()?;
        self.inner.committed.store(target, Ordering::SeqCst);
        // Partial tiles of the tiles now full are no longer needed.
        for (t, _) in files.iter().filter(|(t, _)| t.is_full()) {
            let partials = self.inner.dir.join(format!("{}.p", t.path()));
            let _ = fs::remove_dir_all(partials);
        }
        Ok(())
    }
}

/// Merges two key-ordered walks (descending when `rev`) into one, a key
/// in both once (the staged value).
fn merge_keys(
    stored: impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), AuditError>> + Send,
    staged: impl Iterator<Item = (Vec<u8>, Vec<u8>)> + Send,
    rev: bool,
) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), AuditError>> + Send {
    let mut stored = stored.peekable();
    let mut staged = staged.peekable();
    std::iter::from_fn(move || {
        let order = match (stored.peek(), staged.peek()) {
            (None, None) => return None,
            (Some(Err(_)), _) | (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(Ok((a, _))), Some((b, _))) => {
                let o = a.cmp(b);
                if rev { o.reverse() } else { o }
            }
        };
        match order {
            std::cmp::Ordering::Less => stored.next(),
            std::cmp::Ordering::Greater => staged.next().map(Ok),
            std::cmp::Ordering::Equal => {
                stored.next();
                staged.next().map(Ok)
            }
        }
    })
}

fn io(path: &Path, what: &str, e: std::io::Error) -> AuditError {
    AuditError::Store(format!(
        "cannot {what} {}: {e}; check the disk and the permissions of the data directory",
        path.display()
    ))
}

fn read_tile(dir: &Path, t: &Tile) -> Result<Content, AuditError> {
    let path = dir.join(t.path());
    let bytes = fs::read(&path).map_err(|e| io(&path, "read", e))?;
    let bad = |why: String| AuditError::Store(format!("tile {} is damaged: {why}", path.display()));
    let content = match t.kind {
        Kind::Hashes(_) => {
            Content::Hashes(tile::parse_hash_tile(&bytes).map_err(|e| bad(e.to_string()))?)
        }
        Kind::Entries => Content::Entries(
            tile::bundle_entries(&bytes)
                .map_err(|e| bad(e.to_string()))?
                .into_iter()
                .map(<[u8]>::to_vec)
                .collect(),
        ),
    };
    let width = match &content {
        Content::Hashes(h) => h.len(),
        Content::Entries(e) => e.len(),
    };
    if width != usize::from(t.width) {
        return Err(bad(format!("it holds {width} items, not {}", t.width)));
    }
    Ok(content)
}

/// The right edge of a log of `size` from disk: the partial tiles.
fn load_edge(dir: &Path, size: u64) -> Result<State, String> {
    let mut state = State::default();
    let missing = |t: &Tile, e: AuditError| {
        format!(
            "the tile {} of a log of {size} entries cannot be read ({e})",
            t.path()
        )
    };
    for level in 0..tile::levels(size) {
        let hashes = match tile::edge(Kind::Hashes(level), size) {
            (_, Some(t)) => {
                state.written.insert(t.kind, (t.index, t.width));
                read_tile(dir, &t).map_err(|e| missing(&t, e))?
            }
            (_, None) => Content::Hashes(Vec::new()),
        };
        state.partial.push(Arc::new(hashes));
    }
    if let (_, Some(t)) = tile::edge(Kind::Entries, size) {
        state.written.insert(t.kind, (t.index, t.width));
        state.entries = Arc::new(read_tile(dir, &t).map_err(|e| missing(&t, e))?);
    }
    Ok(state)
}

/// The most entries the bundles on disk hold, up to `size`, when the edge
/// of `size` is missing (for messages).
fn held_size(dir: &Path, size: u64) -> Option<u64> {
    let mut n = size / WIDTH;
    let mut width = size % WIDTH;
    loop {
        if width > 0 {
            let t = Tile {
                kind: Kind::Entries,
                index: n,
                width: WIDTH as u16,
            };
            let partials = dir.join(format!("{}.p", t.path()));
            let best = fs::read_dir(partials)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
                .filter(|w| *w <= width)
                .max();
            if let Some(w) = best {
                return Some(n * WIDTH + w);
            }
        }
        if n == 0 {
            return Some(0);
        }
        n -= 1;
        width = WIDTH - 1;
        let full = Tile {
            kind: Kind::Entries,
            index: n,
            width: WIDTH as u16,
        };
        if dir.join(full.path()).exists() {
            return Some((n + 1) * WIDTH);
        }
    }
}

/// The most entries the entry bundles on disk hold from `from` on: the
/// full bundles after it, then the widest partial of the next (for
/// [`TileStore::rebuild`]).
fn held_from(dir: &Path, from: u64) -> u64 {
    let bundle = |index| Tile {
        kind: Kind::Entries,
        index,
        width: WIDTH as u16,
    };
    let mut n = from / WIDTH;
    while dir.join(bundle(n).path()).exists() {
        n += 1;
    }
    let widest = fs::read_dir(dir.join(format!("{}.p", bundle(n).path())))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .filter(|w| *w < WIDTH)
        .max();
    n * WIDTH + widest.unwrap_or(0)
}

/// Removes tiles beyond a committed `size`: what a sync wrote before a
/// crash kept it from committing.
fn clean_beyond(dir: &Path, size: u64) -> Result<(), AuditError> {
    let kinds = (0..=tile::MAX_LEVEL)
        .map(Kind::Hashes)
        .chain([Kind::Entries]);
    for kind in kinds {
        let level = match kind {
            Kind::Hashes(l) => l,
            Kind::Entries => 0,
        };
        let count = tile::hashes_at(level, size);
        let (mut n, width) = (count / WIDTH, (count % WIDTH) as u16);
        loop {
            let full = Tile {
                kind,
                index: n,
                width: WIDTH as u16,
            };
            let path = dir.join(full.path());
            let partials = dir.join(format!("{}.p", full.path()));
            let mut found = false;
            if path.exists() {
                fs::remove_file(&path).map_err(|e| io(&path, "remove", e))?;
                found = true;
            }
            if let Ok(list) = fs::read_dir(&partials) {
                for e in list.flatten() {
                    let w = e.file_name().to_str().and_then(|w| w.parse::<u16>().ok());
                    if n > count / WIDTH || w.is_none_or(|w| w > width) {
                        let p = e.path();
                        fs::remove_file(&p).map_err(|e| io(&p, "remove", e))?;
                        found = true;
                    }
                }
            }
            if !found && n > count / WIDTH {
                break;
            }
            if !found && n == count / WIDTH {
                n += 1;
                continue;
            }
            n += 1;
        }
    }
    Ok(())
}

/// Writes each tile durably: temporary file, `fsync`, `rename`, then one
/// `fsync` of each directory touched (and of the parents of directories
/// created).
fn write_tiles(dir: &Path, files: &[(Tile, Vec<u8>)]) -> Result<(), AuditError> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut written: Vec<(PathBuf, PathBuf, File)> = Vec::with_capacity(files.len());
    for (t, bytes) in files {
        let path = dir.join(t.path());
        let parent = path.parent().unwrap_or(dir).to_owned();
        if !parent.exists() {
            let mut missing = parent.clone();
            while !missing.exists() {
                if let Some(up) = missing.parent() {
                    dirs.push(up.to_owned());
                    missing = up.to_owned();
                } else {
                    break;
                }
            }
            fs::create_dir_all(&parent).map_err(|e| io(&parent, "create", e))?;
        }
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = File::create(&tmp)
            .and_then(|mut f| f.write_all(bytes).map(|()| f))
            .map_err(|e| io(&path, "write", e))?;
        written.push((tmp, path, file));
        dirs.push(parent);
    }
    // The files' data, then the renames, then the directories that name
    // them: each step's syncs run at once (one device flush for the lot,
    // not one per file), and no step starts before the one before it is
    // durable.
    in_parallel(&written, |(_, path, file)| {
        file.sync_data().map_err(|e| io(path, "write", e))
    })?;
    for (tmp, path, _) in &written {
        fs::rename(tmp, path).map_err(|e| io(path, "write", e))?;
    }
    dirs.sort();
    dirs.dedup();
    in_parallel(&dirs, |d| {
        File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(|e| io(d, "sync", e))
    })
}

/// Runs `f` on every item, each on its own thread (the first on this one),
/// and returns the first error.
fn in_parallel<T: Sync>(
    items: &[T],
    f: impl Fn(&T) -> Result<(), AuditError> + Sync,
) -> Result<(), AuditError> {
    let Some((first, rest)) = items.split_first() else {
        return Ok(());
    };
    std::thread::scope(|scope| {
        let others: Vec<_> = rest.iter().map(|item| scope.spawn(|| f(item))).collect();
        let mut result = f(first);
        for handle in others {
            let r = handle
                .join()
                .unwrap_or_else(|_| Err(AuditError::Store("a tile sync thread panicked".into())));
            result = result.and(r);
        }
        result
    })
}

impl LogStore for TileStore {
    fn size(&self) -> u64 {
        self.inner.size.load(Ordering::SeqCst)
    }

    fn next_seq(&self, source: &str) -> Result<u64, AuditError> {
        match self.get_meta(&next_seq_key(source))? {
            Some(v) => read_u64(&v, "sequence number"),
            None => Ok(1),
        }
    }

    fn index_of(&self, source: &str, seq: u64) -> Result<Option<u64>, AuditError> {
        self.get_meta(&seq_index_key(source, seq))?
            .map(|v| read_u64(&v, "leaf index"))
            .transpose()
    }

    fn entry(&self, index: u64) -> Result<Option<LogEntry>, AuditError> {
        if index >= self.size() {
            return Ok(None);
        }
        let corrupt = |why: String| AuditError::Corrupt { index, why };
        let bytes = self.entry_bytes(index)?;
        if leaf_hash(&bytes) != self.leaf(index)? {
            return Err(corrupt(
                "the entry does not hash to its leaf hash in its level-0 tile".into(),
            ));
        }
        let signed = SignedEvent::decode(bytes.as_slice()).map_err(|e| corrupt(e.to_string()))?;
        let event = Event::decode(signed.event.as_slice()).map_err(|e| corrupt(e.to_string()))?;
        let received_at = match self.get_meta(&received_key(index))? {
            Some(v) if v.len() == 12 => Some(Timestamp {
                seconds: i64::from_be_bytes(v[..8].try_into().expect("8 bytes")),
                nanos: i32::from_be_bytes(v[8..].try_into().expect("4 bytes")),
            }),
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
        let (Some(signed), Some(event)) = (&entry.signed_event, &entry.event) else {
            return Err(AuditError::Store("entry without an event".into()));
        };
        let data = signed.encode_to_vec();
        if data.len() > tile::MAX_ENTRY_BYTES {
            return Err(AuditError::InvalidEvent(format!(
                "the signed event is {} bytes encoded, more than the {} a log entry holds; send \
                 shorter attributes",
                data.len(),
                tile::MAX_ENTRY_BYTES
            )));
        }
        let mut state = self.state();
        let index = self.size();
        if entry.index != index {
            return Err(AuditError::Store(format!(
                "entry index {} is not the next index {index}",
                entry.index
            )));
        }
        // The entry, and every tile it completes.
        let entries = entries_mut(&mut state.entries);
        entries.push(data);
        if entries.len() as u64 == WIDTH {
            let full = std::mem::take(entries);
            state.unsynced.insert(
                (Kind::Entries, index / WIDTH),
                Arc::new(Content::Entries(full)),
            );
        }
        let mut hash = *leaf;
        let mut level = 0usize;
        loop {
            if state.partial.len() <= level {
                state.partial.push(Arc::new(Content::Hashes(Vec::new())));
            }
            let tile_index = tile::hashes_at(level as u8, index + 1).saturating_sub(1) / WIDTH;
            let partial = hashes_mut(&mut state.partial[level]);
            partial.push(hash);
            if (partial.len() as u64) < WIDTH {
                break;
            }
            let full = std::mem::take(partial);
            hash = tile::subtree_of(&full).map_err(|e| AuditError::Store(e.to_string()))?;
            state.unsynced.insert(
                (Kind::Hashes(level as u8), tile_index),
                Arc::new(Content::Hashes(full)),
            );
            level += 1;
        }
        state.staged.insert(
            seq_index_key(&event.source, event.seq),
            index.to_be_bytes().to_vec(),
        );
        state.staged.insert(
            next_seq_key(&event.source),
            (event.seq + 1).to_be_bytes().to_vec(),
        );
        if let Some(t) = &entry.received_at {
            let mut v = t.seconds.to_be_bytes().to_vec();
            v.extend_from_slice(&t.nanos.to_be_bytes());
            state.staged.insert(received_key(index), v);
        }
        state.pending_query.extend(index::keys(event, index));
        self.inner.size.store(index + 1, Ordering::SeqCst);
        Ok(())
    }

    fn node(&self, level: u32, index: u64) -> Result<Hash, AuditError> {
        let at = tile::node_at(level, index);
        match &*self.tile(Kind::Hashes(at.tile_level), at.tile)? {
            Content::Hashes(h) => {
                let hashes = h.get(at.offset..at.offset + at.count).ok_or_else(|| {
                    AuditError::Store(format!("tree node {level}/{index} is not stored"))
                })?;
                tile::subtree_of(hashes).map_err(|e| AuditError::Store(e.to_string()))
            }
            Content::Entries(_) => unreachable!("a hash tile"),
        }
    }

    async fn sync(&self) -> Result<(), AuditError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.sync_blocking())
            .await
            .map_err(|e| AuditError::Store(format!("the sync task failed: {e}")))?
    }

    fn check(&self) -> Result<(), StoreProblem> {
        match &*self.inner.problem.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(p) => Err(p.clone()),
            None => Ok(()),
        }
    }

    fn discard_uncommitted(&self) -> Result<(), AuditError> {
        clean_beyond(&self.inner.dir, self.inner.committed.load(Ordering::SeqCst))
    }

    fn walk(
        &self,
        walk: &index::Walk,
        start: Option<u64>,
        newest_first: bool,
        size: u64,
    ) -> Result<Box<dyn Iterator<Item = Result<u64, AuditError>> + Send + '_>, AuditError> {
        match walk {
            index::Walk::All => Ok(super::by_index(start, newest_first, size)),
            index::Walk::Source(source) => {
                let mut prefix = vec![SEQ_INDEX];
                prefix.extend_from_slice(source.as_bytes());
                prefix.push(0);
                let mut low = prefix.clone();
                let mut high = prefix;
                // A source's entries in seq order are in index order: the
                // seq to start from is the first (or last) whose index is
                // at or after (before) the token, by binary search.
                match start {
                    Some(index) => {
                        let seq = self.seq_near(source, index, newest_first)?;
                        if newest_first {
                            low.extend_from_slice(&[0; 8]);
                            high.extend_from_slice(&seq.to_be_bytes());
                            high.push(0);
                        } else {
                            low.extend_from_slice(&seq.to_be_bytes());
                            high.extend_from_slice(&[0xff; 9]);
                        }
                    }
                    None => {
                        low.extend_from_slice(&[0; 8]);
                        high.extend_from_slice(&[0xff; 9]);
                    }
                }
                // Keys staged since the last sync (a journal acknowledges
                // entries before the store syncs) merged with sled's, in
                // key order; a key in both (mid-sync) once.
                let staged: Vec<(Vec<u8>, Vec<u8>)> = self
                    .state()
                    .staged
                    .range(low.clone()..high.clone())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let range = self.inner.meta.range(low..high);
                let stored = range.map(|item| -> Result<(Vec<u8>, Vec<u8>), AuditError> {
                    let (k, v) = item?;
                    Ok((k.to_vec(), v.to_vec()))
                });
                let merged: Box<dyn Iterator<Item = _> + Send> = if newest_first {
                    Box::new(merge_keys(stored.rev(), staged.into_iter().rev(), true))
                } else {
                    Box::new(merge_keys(stored, staged.into_iter(), false))
                };
                Ok(Box::new(merged.map(|item| {
                    let (_, v) = item?;
                    read_u64(&v, "leaf index")
                })))
            }
            index::Walk::Time { .. } => {
                let start = match start {
                    Some(index) => {
                        let time = self
                            .entry(index)?
                            .and_then(|e| e.event)
                            .and_then(|e| e.time)
                            .map(|t| (t.seconds, t.nanos));
                        Some((index, time))
                    }
                    None => None,
                };
                let state = self.state();
                Ok(index::walk(
                    &self.inner.query,
                    &state.pending_query,
                    walk,
                    start,
                    newest_first,
                ))
            }
            other => {
                let state = self.state();
                Ok(index::walk(
                    &self.inner.query,
                    &state.pending_query,
                    other,
                    start.map(|i| (i, None)),
                    newest_first,
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests;
