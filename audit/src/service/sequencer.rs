//! One sequencer at a time on PostgreSQL: the replica whose session holds
//! the sequencer lease appends; the others refuse appends
//! ([`AuditError::NotSequencer`], UNAVAILABLE), follow the log the database
//! holds and serve every read, and take over when the holder's session
//! dies. A new sequencer checks the database's signed tree head against its
//! tree, and against the largest head this replica saw, before it signs
//! anything ([`AuditLog::take_over`]).

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use super::AuditLog;
use crate::{error::AuditError, head::TreeHead, store::PgLogStore};

/// How often a replica checks its lease (holder) or asks for it and reads
/// the database's head (followers).
pub const LEASE_POLL: Duration = Duration::from_millis(250);

impl AuditLog<PgLogStore> {
    /// The head `note` (from the database), checked against this log's key.
    fn stored_head(&self, note: Option<String>) -> Result<Option<TreeHead>, AuditError> {
        let Some(note) = note else {
            return Ok(None);
        };
        let checkpoint = self.signer.verifier().open_checkpoint(&note).map_err(|e| {
            AuditError::TreeHead(format!(
                "the signed tree head in the audit database is not a checkpoint signed by this \
                 log's key: {e}. It was altered, or the key or origin changed; restore the audit \
                 database from a backup"
            ))
        })?;
        Ok(Some(TreeHead {
            size: checkpoint.size,
            root: checkpoint.root,
            note,
        }))
    }

    /// Refuses a database whose head is smaller than the largest this
    /// replica saw: it was rolled back (restored from an older backup).
    fn refuse_rollback(&self, found: Option<&TreeHead>) -> Result<(), AuditError> {
        let seen = self.head().head().cloned();
        let Some(seen) = seen else {
            return Ok(());
        };
        let size = found.map_or(0, |h| h.size);
        if size < seen.size || (size == seen.size && found.is_some_and(|h| h.root != seen.root)) {
            let message = format!(
                "the audit database holds a signed tree head of {size} entries, but this \
                 replica saw one of {} entries with root {}: the database was rolled back or \
                 replaced. Restore it from a backup holding at least {} entries",
                seen.size,
                seen.root_hex(),
                seen.size
            );
            tracing::error!("{message}");
            return Err(AuditError::TreeHead(message));
        }
        Ok(())
    }

    /// A follower reads the log the database holds now and serves it.
    pub async fn follow(&self) -> Result<(), AuditError> {
        if self.store.is_sequencer() {
            return Ok(());
        }
        let (size, note) = self.store.load_head().await?;
        let head = self.stored_head(note)?;
        self.refuse_rollback(head.as_ref())?;
        {
            let _guard = self.write.lock().unwrap_or_else(|e| e.into_inner());
            if self.store.is_sequencer() {
                return Ok(());
            }
            self.store.follow(size);
        }
        if let Some(h) = head {
            self.head().record_journaled(h);
        }
        self.durable
            .fetch_max(size, std::sync::atomic::Ordering::SeqCst);
        self.note_signed(size);
        Ok(())
    }

    /// Called once this replica holds the lease: loads the log and its
    /// signed head from the database, checks them (the head signed by this
    /// log's key, no smaller than any head this replica saw, its root the
    /// root of the stored tree at its size) and starts appending. On an
    /// error the caller gives the lease up.
    pub async fn take_over(&self) -> Result<(), AuditError> {
        let (size, note) = self.store.load_head().await?;
        let head = self.stored_head(note)?;
        self.refuse_rollback(head.as_ref())?;
        self.store.follow(size);
        if let Some(h) = head {
            self.head().record_journaled(h);
        }
        self.check_stored_log(size)?;
        {
            let _guard = self.write.lock().unwrap_or_else(|e| e.into_inner());
            self.store.become_sequencer(size);
        }
        self.durable
            .fetch_max(size, std::sync::atomic::Ordering::SeqCst);
        self.note_signed(size);
        Ok(())
    }
}

/// Competes for the sequencer lease until `stop` turns true: the holder
/// checks its session, the others ask for the lease and follow the log.
/// `sequencer` says whether this replica appends now (gRPC health).
pub async fn run_lease(
    log: Arc<AuditLog<PgLogStore>>,
    sequencer: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let store = log.store();
        if store.is_sequencer() {
            if !store.lease_alive().await {
                tracing::warn!(
                    "the sequencer lease is lost (its PostgreSQL session ended): appends are \
                     refused until this replica or another takes it"
                );
                store.give_up_lease().await;
            }
        } else {
            match store.try_lease().await {
                Ok(true) => match log.take_over().await {
                    Ok(()) => tracing::info!(
                        entries = log.size(),
                        "this audit replica holds the sequencer lease and appends"
                    ),
                    Err(e) => {
                        tracing::error!("cannot take over as the audit sequencer: {e}");
                        store.give_up_lease().await;
                    }
                },
                Ok(false) => {
                    if let Err(e) = log.follow().await {
                        tracing::warn!("cannot follow the audit log in PostgreSQL: {e}");
                    }
                }
                Err(e) => tracing::warn!("cannot ask for the sequencer lease: {e}"),
            }
        }
        sequencer.send_if_modified(|s| {
            let now = store.is_sequencer();
            std::mem::replace(s, now) != now
        });
        tokio::select! {
            _ = tokio::time::sleep(LEASE_POLL) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            store.give_up_lease().await;
            return;
        }
    }
}
