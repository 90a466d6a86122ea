//! Durable commits for sled. sled 0.34's `flush()` ends in
//! `sync_file_range`, which is not a data-integrity sync, so a commit here is
//! `flush()` followed by `fdatasync` of the data file. Concurrent callers
//! share one flush + sync (group commit).
//!
//! Fail-stop: sled keeps the I/O error it met (a full disk, a read-only
//! remount) and returns it from every later call, so a service would keep
//! failing until restarted by hand. In the service binaries
//! ([`fail_stop_on_storage_errors`]) a failed sync is tried once more after
//! [`FAIL_STOP_RETRY`]; failing again, the process logs why at ERROR and
//! exits with status 74 (EX_IOERR), so that its supervisor
//! (`Restart=on-failure`, Kubernetes) restarts it. Nothing acknowledged is
//! lost: an acknowledgement waits for a sync that succeeded.

use std::{
    fs::File,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// How long a failed sync waits before it is tried once more, in the
/// service binaries, before the process stops.
pub const FAIL_STOP_RETRY: Duration = Duration::from_secs(1);

/// The exit status of a service stopped by a storage error (EX_IOERR).
pub const FAIL_STOP_STATUS: i32 = 74;

static FAIL_STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes a sync failure that does not clear stop the process (see the
/// module documentation). Called once by the service binaries; tests that
/// run services in-process keep the default, an error answered to callers.
pub fn fail_stop_on_storage_errors() {
    FAIL_STOP.store(true, Ordering::SeqCst);
}

/// Runs `write`, which makes something durable under `path` (a sync, or a
/// file written and synced), under the fail-stop rule of the module
/// documentation: with [`fail_stop_on_storage_errors`] on, a failure is
/// tried once more after [`FAIL_STOP_RETRY`] and, failing again, stops the
/// process with [`FAIL_STOP_STATUS`]; otherwise the error is returned.
pub fn fail_stop<T, E: std::fmt::Display>(
    path: &Path,
    mut write: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let first = match write() {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    if !FAIL_STOP.load(Ordering::SeqCst) {
        return Err(first);
    }
    std::thread::sleep(FAIL_STOP_RETRY);
    match write() {
        Ok(v) => Ok(v),
        Err(again) => {
            tracing::error!(
                path = %path.display(),
                "storage keeps failing ({first}; {FAIL_STOP_RETRY:?} later: {again}): stopping \
                 with status {FAIL_STOP_STATUS} so that the supervisor restarts this service \
                 once the disk is usable; nothing acknowledged is lost"
            );
            std::process::exit(FAIL_STOP_STATUS);
        }
    }
}

/// Why the database could not be opened or synced.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("database at {path}: {source}")]
    Sled {
        /// The data directory.
        path: PathBuf,
        /// Why.
        source: sled::Error,
    },
    /// The sync failed.
    #[error("cannot sync the database to disk: {0}")]
    Sync(String),
}

/// A sled database with durable, group-committed sync.
#[derive(Clone, Debug)]
pub struct DurableDb {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: sled::Db,
    data_file: File,
    path: PathBuf,
    requested: AtomicU64,
    synced: Mutex<u64>,
}

/// Removes the snapshot files sled 0.34 never finished. sled writes a
/// snapshot to `snap.<lsn>.generating` and renames it into place once it is
/// complete and synced; a write cut short (a full disk, a crash) leaves the
/// partial file behind, and the next open takes it for the newest snapshot
/// and refuses the whole database ("Read corrupted data"). Such a file never
/// was a snapshot, so removing it loses nothing.
fn remove_partial_snapshots(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| n.starts_with("snap.") && n.ends_with(".generating")) {
            tracing::warn!(path = %path.display(), "removing an unfinished sled snapshot");
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// How long [`DurableDb::open`] waits for the data directory's lock, held by
/// a process (or a server in this process) that is still shutting down.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

/// sled's own page cache size, which [`DurableDb::open`] keeps: 1 GiB.
pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;

/// Opens sled at `dir` with a page cache of `cache_bytes`; while another
/// holder's lock on it is still being released (a restart right after a
/// stop), tries again for [`LOCK_WAIT`], then answers that error: two live
/// services on one directory are refused.
fn open_waiting_for_lock(dir: &Path, cache_bytes: u64) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .open()
        {
            // sled 0.34 wraps the lock failure as ErrorKind::Other with
            // this text (config.rs), so the text is what says it.
            Err(sled::Error::Io(e))
                if e.to_string().starts_with("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

impl DurableDb {
    /// Opens (creating if needed) the sled database in `dir`, with sled's
    /// default page cache ([`DEFAULT_CACHE_BYTES`]).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (creating if needed) the sled database in `dir`, caching at
    /// most about `cache_bytes` of its pages in memory (sled's
    /// `cache_capacity`): a service whose data mostly lives elsewhere keeps
    /// its memory small this way.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let err = |source| StoreError::Sled {
            path: dir.to_owned(),
            source,
        };
        // Created 0700 whatever the umask: the data is the service's alone.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| err(e.into()))?;
        remove_partial_snapshots(dir).map_err(|e| err(e.into()))?;
        let db = open_waiting_for_lock(dir, cache_bytes).map_err(err)?;
        // sled 0.34 keeps its log and pages in `<dir>/db`.
        let data_file = File::open(dir.join("db")).map_err(|e| err(e.into()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                data_file,
                path: dir.to_owned(),
                requested: AtomicU64::new(0),
                synced: Mutex::new(0),
            }),
        })
    }

    /// The sled database.
    pub fn db(&self) -> &sled::Db {
        &self.inner.db
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Opens a tree, naming the directory in the error.
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        self.inner
            .db
            .open_tree(name)
            .map_err(|source| StoreError::Sled {
                path: self.inner.path.clone(),
                source,
            })
    }

    /// Makes every write that completed before this call durable. Blocking.
    pub fn sync_blocking(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        let ticket = inner.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut synced = inner.synced.lock().unwrap_or_else(|e| e.into_inner());
        if *synced >= ticket {
            // A sync that started after our writes already covered them.
            return Ok(());
        }
        let target = inner.requested.load(Ordering::SeqCst);
        let flush_and_sync = || -> Result<(), StoreError> {
            inner
                .db
                .flush()
                .map_err(|e| StoreError::Sync(e.to_string()))?;
            inner
                .data_file
                .sync_data()
                .map_err(|e| StoreError::Sync(e.to_string()))
        };
        fail_stop(&inner.path, flush_and_sync)?;
        *synced = target;
        Ok(())
    }

    /// Makes every write that completed before this call durable, on a
    /// blocking thread; concurrent callers share one flush + sync.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.sync_blocking())
            .await
            .map_err(|e| StoreError::Sync(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_data_directory_is_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("a/b/data");
        let _db = DurableDb::open(&dir).unwrap();
        for d in [parent.path().join("a"), parent.path().join("a/b"), dir] {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
    }

    #[test]
    fn a_restart_waits_for_the_lock_a_stopping_holder_still_has() {
        let dir = tempfile::tempdir().unwrap();
        let first = DurableDb::open(dir.path()).unwrap();
        first.db().insert(b"k", b"v".as_slice()).unwrap();
        first.sync_blocking().unwrap();
        // The holder lets go a moment after the second open begins.
        let (tx, rx) = std::sync::mpsc::channel();
        let releaser = std::thread::spawn(move || {
            rx.recv().unwrap();
            std::thread::sleep(Duration::from_millis(300));
            drop(first);
        });
        tx.send(()).unwrap();
        let second = DurableDb::open(dir.path()).unwrap();
        releaser.join().unwrap();
        assert_eq!(
            second.db().get(b"k").unwrap().as_deref(),
            Some(b"v".as_slice())
        );
    }

    #[tokio::test]
    async fn synced_writes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = DurableDb::open(dir.path()).unwrap();
            db.db().insert(b"k", b"v".as_slice()).unwrap();
            let mut joins = Vec::new();
            for _ in 0..8 {
                let db = db.clone();
                joins.push(tokio::spawn(async move { db.sync().await }));
            }
            for j in joins {
                j.await.unwrap().unwrap();
            }
        }
        let db = DurableDb::open(dir.path()).unwrap();
        assert_eq!(db.db().get(b"k").unwrap().unwrap().as_ref(), b"v");
    }

    #[tokio::test]
    async fn an_unfinished_snapshot_does_not_make_the_database_unreadable() {
        // Found by the end-to-end disk test: sled started on a full disk
        // left an empty `snap.<lsn>.generating`, and every later open failed
        // with "Read corrupted data" even after space returned.
        let dir = tempfile::tempdir().unwrap();
        {
            let db = DurableDb::open(dir.path()).unwrap();
            db.db().insert(b"k", b"v".as_slice()).unwrap();
            db.sync().await.unwrap();
        }
        std::fs::write(dir.path().join("snap.FFFFFFFFFFFFFFFF.generating"), b"").unwrap();
        let db = DurableDb::open(dir.path()).unwrap();
        assert_eq!(db.db().get(b"k").unwrap().unwrap().as_ref(), b"v");
        assert!(!dir.path().join("snap.FFFFFFFFFFFFFFFF.generating").exists());
    }
}
