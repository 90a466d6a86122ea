//! Moving a log that earlier versions kept in sled (the `audit_log` tree of
//! [`SledStore`]) into tiles, once, at the first start of this version.
//!
//! Each old entry must hash to the leaf hash the old store kept for it; it
//! is appended to the [`TileStore`], and every [`CHUNK`] entries the tiles
//! and the index are committed and the roots of both stores compared at
//! that size. At the end the roots are compared at the old size and at the
//! size of the largest signed tree head (with its root), and only then is
//! the old tree dropped. A crash part way resumes from the last committed
//! chunk: what is committed was checked before it was written.

use prost::Message;
use twokey_runtime::durable::DurableDb;

use super::{LogStore, SledStore, TileStore};
use crate::{
    error::AuditError,
    merkle::{Hash, leaf_hash, subtree_root},
};

/// The sled tree of the old store.
pub const LEGACY_TREE: &str = "audit_log";

/// Entries committed at a time.
pub const CHUNK: u64 = 4096;

fn root_of(store: &impl LogStore, size: u64) -> Result<Hash, AuditError> {
    subtree_root(0, size, &mut |l, i| store.node(l, i))
}

/// Moves the old log in `db`, if there is one, into `store`; `signed` is
/// the largest signed tree head (size, root), if known.
pub fn migrate(
    db: &DurableDb,
    store: &TileStore,
    signed: Option<(u64, Hash)>,
) -> Result<(), AuditError> {
    let exists = db
        .db()
        .tree_names()
        .iter()
        .any(|n| n.as_ref() == LEGACY_TREE.as_bytes());
    if !exists {
        return Ok(());
    }
    let dir = db.path().display().to_string();
    let altered = |why: String| {
        AuditError::TreeHead(format!(
            "cannot move the log kept in sled in {dir} into tiles: {why}. Restore the data \
             directory from a backup and start again; the old log stays in place until it moved \
             whole"
        ))
    };
    let old = SledStore::with_db(db.clone())?;
    let total = old.size();
    let done = store.size();
    if done > total {
        return Err(altered(format!(
            "the tiles hold {done} entries, more than the {total} of the old log"
        )));
    }
    if done < total {
        tracing::info!(
            entries = total,
            already = done,
            "moving the audit log from sled into tiles (once, at the first start of this version)"
        );
    }
    for index in done..total {
        let entry = old
            .entry(index)?
            .filter(|e| e.index == index)
            .ok_or_else(|| altered(format!("entry {index} is missing or not at its index")))?;
        let data = entry
            .signed_event
            .as_ref()
            .ok_or_else(|| altered(format!("entry {index} holds no signed event")))?
            .encode_to_vec();
        let leaf = leaf_hash(&data);
        if leaf != old.node(0, index)? {
            return Err(altered(format!(
                "entry {index} does not hash to the leaf hash stored for it"
            )));
        }
        store.append(&entry, &leaf)?;
        let size = index + 1;
        if size % CHUNK == 0 || size == total {
            store.sync_blocking()?;
            if root_of(store, size)? != root_of(&old, size)? {
                return Err(altered(format!(
                    "the tiles give another root than the old store at {size} entries"
                )));
            }
        }
    }
    if total > 0 && root_of(store, total)? != root_of(&old, total)? {
        return Err(altered(format!(
            "the tiles give another root than the old store at {total} entries"
        )));
    }
    if let Some((size, root)) = signed
        && size <= total
        && (root_of(store, size)? != root || root_of(&old, size)? != root)
    {
        return Err(altered(format!(
            "the root at {size} entries is not the root of the signed tree head {}",
            hex::encode(root)
        )));
    }
    drop(old);
    db.db().drop_tree(LEGACY_TREE)?;
    db.sync_blocking()?;
    if total > 0 {
        tracing::info!(
            entries = total,
            "the audit log is in tiles now; the old sled tree was dropped"
        );
    }
    Ok(())
}
