//! Restoring the log from the sources' kept copies.
//!
//! A log restored from an older backup holds fewer entries than checkpoints
//! it signed before, and its sources kept those checkpoints (receipts) and
//! the entries they sent. A source's hello shows its checkpoint; the log
//! checks it against its own key and, when it is larger than what the store
//! holds, takes no new events and signs nothing ([`AuditError::Restoring`])
//! until it holds that checkpoint's entries again. The sources send the
//! entries they kept, each at the leaf index audit acknowledged it at
//! ([`AuditLog::restore_entries`]). Once every missing index is held, the
//! root the stored and the sent entries give is checked against the
//! checkpoint's before anything is written; then all are written and synced
//! together and the checkpoint is signed again (Ed25519 is deterministic:
//! it is the same note). Entries that do not give the checkpoint's root
//! are dropped and the restore waits for the sources to send again; a
//! restore that cannot complete says so at ERROR every minute.

use std::collections::BTreeMap;

use prost::Message;
use twokey_proto::audit::v1::{Event, LogEntry, SignedEvent};
use twokey_runtime::{SpiffeId, time::to_timestamp};

use super::AuditLog;
use crate::{
    error::AuditError,
    head::TreeHead,
    merkle::{self, Hash, leaf_hash, node_hash},
    store::LogStore,
};

/// Bytes of sent entries a restore holds in memory, at most: a backup so
/// old that its missing tail is larger is refused with a message (restore
/// a newer backup).
const MAX_BYTES: usize = 512 << 20;

/// A restore in progress.
#[derive(Debug)]
pub(crate) struct Restore {
    /// The largest checkpoint a source showed: what the log must hold.
    target: TreeHead,
    /// Who showed it.
    shown_by: String,
    /// The first index the store did not hold when the restore began.
    from: u64,
    /// Entries sent, by index: the signed event and its leaf hash.
    entries: BTreeMap<u64, (SignedEvent, Hash)>,
    /// Their encoded size.
    bytes: usize,
    /// What stops the restore now, if anything beyond missing entries.
    problem: Option<String>,
}

impl Restore {
    /// The first index in `[from, target)` no source has sent.
    fn first_missing(&self) -> u64 {
        let mut next = self.from;
        for index in self
            .entries
            .range(self.from..self.target.size)
            .map(|(i, _)| *i)
        {
            if index != next {
                break;
            }
            next += 1;
        }
        next
    }

    fn describe(&self) -> String {
        let missing = self.first_missing();
        let mut text = format!(
            "audit is restoring its log: it holds {} entries, but signed a checkpoint of {} \
             entries with root {} (shown by {}); it takes no new events and signs nothing until \
             the sources re-send the entries they kept ({} of {} received, first missing index {})",
            self.from,
            self.target.size,
            self.target.root_hex(),
            self.shown_by,
            self.entries.len(),
            self.target.size - self.from,
            missing,
        );
        if let Some(p) = &self.problem {
            text.push_str("; ");
            text.push_str(p);
        }
        text
    }
}

/// Where a restore stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreProgress {
    /// Entries the log holds.
    pub size: u64,
    /// Entries it must hold (equal to `size` when no restore is under way).
    pub target: u64,
    /// Entries of the call taken.
    pub accepted: u64,
    /// The first index still missing (`size` when none is).
    pub next_missing: u64,
}

impl<S: LogStore> AuditLog<S> {
    /// `Err(Restoring)` while a restore is under way.
    pub(crate) fn refuse_while_restoring(&self) -> Result<(), AuditError> {
        match &*self.restore_state() {
            Some(r) => Err(AuditError::Restoring(r.describe())),
            None => Ok(()),
        }
    }

    fn restore_state(&self) -> std::sync::MutexGuard<'_, Option<Restore>> {
        self.restore.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a restore is under way.
    pub fn is_restoring(&self) -> bool {
        self.restore_state().is_some()
    }

    /// Entries a restore under way still needs (0 when none is).
    pub fn restore_missing(&self) -> u64 {
        self.restore_state()
            .as_ref()
            .map_or(0, |r| r.target.size - r.from - r.entries.len() as u64)
    }

    /// Logs at ERROR what a restore under way waits for (the service calls
    /// it every minute), and returns whether one is.
    pub fn restore_alarm(&self) -> bool {
        match &*self.restore_state() {
            Some(r) => {
                tracing::error!(
                    target_size = r.target.size,
                    store_size = r.from,
                    "{}; a source that no longer keeps its entries cannot help: see \
                     docs/RELIABILITY.md, \"Audit restored from a backup\"",
                    r.describe()
                );
                true
            }
            None => false,
        }
    }

    /// A source's hello with `note`, the checkpoint it accepted last. A
    /// checkpoint of this log (its own signature) larger than the store
    /// starts a restore, or raises the target of one under way. Returns the
    /// first missing index while a restore is under way (the source is
    /// told to send what it kept from there), else `None`.
    pub fn hello(&self, peer: &SpiffeId, note: &str) -> Option<u64> {
        if !note.is_empty() {
            match self.signer.verifier().open_checkpoint(note) {
                // A replica that does not append (a PostgreSQL follower,
                // or one taking the lease over) cannot tell what the log
                // lost: its size may lag the database's.
                Ok(c) if c.origin == self.signer.name() && self.store.appends() => {
                    // Serialised with appends, so none lands in the range.
                    let _guard = self.write.lock().unwrap_or_else(|e| e.into_inner());
                    let size = self.store.size();
                    let mut state = self.restore_state();
                    let target = TreeHead {
                        size: c.size,
                        root: c.root,
                        note: note.to_owned(),
                    };
                    match &mut *state {
                        Some(r) if r.target.size < c.size => {
                            r.target = target;
                            r.shown_by = peer.to_string();
                        }
                        Some(_) => {}
                        None if c.size > size => {
                            let r = Restore {
                                target,
                                shown_by: peer.to_string(),
                                from: size,
                                entries: BTreeMap::new(),
                                bytes: 0,
                                problem: None,
                            };
                            tracing::error!(
                                %peer,
                                store_size = size,
                                signed_size = c.size,
                                "the log holds fewer entries than a checkpoint it signed: it was \
                                 restored from an older backup or lost entries; {}",
                                r.describe()
                            );
                            *state = Some(r);
                        }
                        None => {}
                    }
                }
                Ok(c) => {
                    tracing::warn!(%peer, origin = %c.origin, "hello with another log's checkpoint")
                }
                Err(e) => {
                    tracing::warn!(%peer, "hello with a checkpoint that does not verify with this log's key: {e}")
                }
            }
        }
        self.restore_state().as_ref().map(Restore::first_missing)
    }

    /// Takes entries `peer` kept, each at the index audit acknowledged it
    /// at, for the restore under way; then completes it if nothing is
    /// missing any more. Entries outside the missing range or already held
    /// are skipped; an entry that is not `peer`'s own signed event is
    /// refused (nothing of the call is taken).
    pub async fn restore_entries(
        &self,
        peer: &SpiffeId,
        items: Vec<(u64, SignedEvent)>,
    ) -> Result<RestoreProgress, AuditError> {
        for (_, signed) in &items {
            self.verify_from(peer, signed)?;
        }
        let mut accepted = 0;
        {
            let mut state = self.restore_state();
            if let Some(r) = state.as_mut() {
                for (index, signed) in items {
                    if index < r.from || index >= r.target.size {
                        continue;
                    }
                    let data = signed.encode_to_vec();
                    if let Some((held, _)) = r.entries.get(&index) {
                        if held.encode_to_vec() != data {
                            r.problem = Some(format!(
                                "two different entries were sent for index {index} (the second \
                                 by {peer}); the one whose root matches is kept"
                            ));
                        }
                        continue;
                    }
                    if r.bytes + data.len() > MAX_BYTES {
                        r.problem = Some(format!(
                            "the missing entries are larger than a restore holds in memory \
                             ({} MiB): restore a newer backup of the data directory",
                            MAX_BYTES >> 20
                        ));
                        break;
                    }
                    r.bytes += data.len();
                    r.entries.insert(index, (signed, leaf_hash(&data)));
                    accepted += 1;
                }
            }
        }
        let mut progress = self.complete_restore().await?;
        progress.accepted = accepted;
        Ok(progress)
    }

    /// Completes the restore under way if every missing entry is held and
    /// they give the signed root; see the module documentation.
    async fn complete_restore(&self) -> Result<RestoreProgress, AuditError> {
        let written = {
            let _guard = self.write.lock().unwrap_or_else(|e| e.into_inner());
            let mut state = self.restore_state();
            let Some(r) = state.as_mut() else {
                let size = self.size();
                return Ok(RestoreProgress {
                    size,
                    target: size,
                    accepted: 0,
                    next_missing: size,
                });
            };
            let missing = r.first_missing();
            if missing < r.target.size {
                return Ok(RestoreProgress {
                    size: r.from,
                    target: r.target.size,
                    accepted: 0,
                    next_missing: missing,
                });
            }
            match self.write_restored(r) {
                Ok(()) => {
                    let r = state.take().expect("a restore is under way");
                    Some(r)
                }
                Err(why) => {
                    tracing::error!(target_size = r.target.size, "restore failed: {why}");
                    r.problem = Some(why);
                    r.entries.clear();
                    r.bytes = 0;
                    None
                }
            }
        };
        let Some(done) = written else {
            return Ok(self
                .restore_state()
                .as_ref()
                .map_or_else(RestoreProgress::none, |r| RestoreProgress {
                    size: r.from,
                    target: r.target.size,
                    accepted: 0,
                    next_missing: r.first_missing(),
                }));
        };
        self.make_durable(done.target.size).await?;
        let signed = self.checkpoint()?;
        if signed.note != done.target.note {
            tracing::warn!(
                "the checkpoint signed after the restore differs in bytes from the one shown"
            );
        }
        tracing::info!(
            restored = done.target.size - done.from,
            entries = done.target.size,
            root = %done.target.root_hex(),
            "restore complete: the log holds the entries of the largest checkpoint it signed again"
        );
        Ok(RestoreProgress {
            size: done.target.size,
            target: done.target.size,
            accepted: 0,
            next_missing: done.target.size,
        })
    }

    /// Checks the held entries against the target (root, then each
    /// source's sequence numbers continuing the store's) and writes them;
    /// nothing is written unless all pass. Caller holds the write lock.
    fn write_restored(&self, r: &Restore) -> Result<(), String> {
        if self.store.size() != r.from {
            return Err(format!(
                "the store holds {} entries, not the {} it held when the restore began",
                self.store.size(),
                r.from
            ));
        }
        let held = |index: u64| r.entries.get(&index).map(|(_, h)| *h);
        let root = root_with(self, r.from, r.target.size, &held).map_err(|e| e.to_string())?;
        if root != r.target.root {
            return Err(format!(
                "the entries the sources sent give root {} at {} entries, not the signed root {}: \
                 a source sent entries other than those stored before; they were dropped",
                hex::encode(root),
                r.target.size,
                r.target.root_hex()
            ));
        }
        let mut next: BTreeMap<String, u64> = BTreeMap::new();
        let mut decoded = Vec::with_capacity(r.entries.len());
        for (index, (signed, _)) in r.entries.range(r.from..r.target.size) {
            let event = Event::decode(signed.event.as_slice()).map_err(|e| e.to_string())?;
            let expected = match next.get(&event.source) {
                Some(n) => *n,
                None => self
                    .store
                    .next_seq(&event.source)
                    .map_err(|e| e.to_string())?,
            };
            if event.seq != expected {
                return Err(format!(
                    "entry {index} is event {} of {}, where {expected} comes next",
                    event.seq, event.source
                ));
            }
            next.insert(event.source.clone(), expected + 1);
            decoded.push((*index, signed.clone(), event));
        }
        let now = to_timestamp(self.clock.now());
        for (index, signed, event) in decoded {
            let data = signed.encode_to_vec();
            let entry = LogEntry {
                index,
                signed_event: Some(signed),
                event: Some(event),
                received_at: Some(now),
            };
            self.stage(&entry, data).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

impl RestoreProgress {
    fn none() -> Self {
        Self {
            size: 0,
            target: 0,
            accepted: 0,
            next_missing: 0,
        }
    }
}

/// The root of the first `end` leaves: complete subtrees below `from` from
/// the store, the rest from `held` leaf hashes.
fn root_with<S: LogStore>(
    log: &AuditLog<S>,
    from: u64,
    end: u64,
    held: &dyn Fn(u64) -> Option<Hash>,
) -> Result<Hash, AuditError> {
    fn node<S: LogStore>(
        log: &AuditLog<S>,
        from: u64,
        held: &dyn Fn(u64) -> Option<Hash>,
        level: u32,
        index: u64,
    ) -> Result<Hash, AuditError> {
        let start = index << level;
        if (index + 1) << level <= from {
            return log.store.node(level, index);
        }
        if level == 0 {
            return held(start)
                .ok_or_else(|| AuditError::Store(format!("entry {start} is not held")));
        }
        Ok(node_hash(
            &node(log, from, held, level - 1, 2 * index)?,
            &node(log, from, held, level - 1, 2 * index + 1)?,
        ))
    }
    merkle::subtree_root(0, end, &mut |level, index| {
        node(log, from, held, level, index)
    })
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use ed25519_dalek::SigningKey;
    use twokey_runtime::{
        error::{ErrorKind, ServiceError},
        events::EventSigner,
    };

    use super::super::tests::{BROKER, Fixture, VAULT, event, fixture, id};
    use super::*;
    use crate::checkpoint::{Checkpoint, CheckpointSigner};

    /// The events of a log in order: (source, seq, at index).
    fn history(f: &Fixture) -> Vec<(&EventSigner, u64)> {
        // Interleaved as two sources' events land: v1 b1 v2 v3 b2 b3 v4 b4.
        let (v, b) = (&f.vault, &f.broker);
        vec![
            (v, 1),
            (b, 1),
            (v, 2),
            (v, 3),
            (b, 2),
            (b, 3),
            (v, 4),
            (b, 4),
        ]
    }

    async fn append(f: &Fixture, log: &AuditLog<crate::store::TileStore>, n: usize) {
        for (signer, seq) in history(f).into_iter().take(n) {
            log.append(signer.source(), event(signer, seq, "a", f.start))
                .await
                .unwrap();
        }
    }

    /// What each source kept, by the index it was acknowledged at, from `from`.
    fn kept(f: &Fixture, source: &str, from: usize) -> Vec<(u64, SignedEvent)> {
        history(f)
            .into_iter()
            .enumerate()
            .skip(from)
            .filter(|(_, (s, _))| s.source().as_str() == source)
            .map(|(i, (s, seq))| (i as u64, event(s, seq, "a", f.start)))
            .collect()
    }

    /// The same log twice: `full` holds all 8 entries and signed a
    /// checkpoint of them; `backup` holds the first 3 (an older backup).
    async fn full_and_backup() -> (Fixture, Fixture, String) {
        let full = fixture();
        append(&full, &full.log, 8).await;
        let note = full.log.checkpoint().unwrap().note;
        let backup = fixture();
        append(&backup, &backup.log, 3).await;
        (full, backup, note)
    }

    #[tokio::test]
    async fn a_restored_backup_takes_nothing_new_until_the_sources_send_what_they_kept() {
        let (full, b, note) = full_and_backup().await;
        let (v, br) = (id(VAULT), id(BROKER));
        assert_eq!(b.log.hello(&v, &note), Some(3));
        assert!(b.log.is_restoring());
        assert_eq!(b.log.restore_missing(), 5);

        // Meanwhile: no new event, no checkpoint (never a smaller tree).
        let refused = b
            .log
            .append(&v, event(&b.vault, 4, "new", b.start))
            .await
            .unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Unavailable);
        assert!(
            refused
                .to_string()
                .contains("holds 3 entries, but signed a checkpoint of 8"),
            "{refused}"
        );
        assert_eq!(
            b.log.checkpoint().unwrap_err().kind(),
            ErrorKind::Unavailable
        );

        // The vault's kept events alone leave the broker's missing.
        let p = b
            .log
            .restore_entries(&v, kept(&full, VAULT, 3))
            .await
            .unwrap();
        assert_eq!((p.size, p.target, p.accepted, p.next_missing), (3, 8, 2, 4));
        assert!(b.log.is_restoring());
        assert_eq!(
            b.log.store().size(),
            3,
            "nothing written before it is whole"
        );

        // The broker's complete it: the same checkpoint, byte for byte.
        let p = b
            .log
            .restore_entries(&br, kept(&full, BROKER, 3))
            .await
            .unwrap();
        assert_eq!((p.size, p.target, p.accepted, p.next_missing), (8, 8, 3, 8));
        assert!(!b.log.is_restoring());
        assert_eq!(b.log.checkpoint().unwrap().note, note);
        for i in 0..8 {
            assert_eq!(
                b.log.entry(i).unwrap().unwrap().signed_event,
                full.log.entry(i).unwrap().unwrap().signed_event
            );
        }
        // New events go after it.
        assert_eq!(
            b.log
                .append(&v, event(&b.vault, 5, "new", b.start))
                .await
                .unwrap(),
            super::super::Ack::Stored { seq: 5, index: 8 }
        );
    }

    #[tokio::test]
    async fn entries_that_do_not_give_the_signed_root_are_dropped_and_nothing_is_written() {
        let (full, b, note) = full_and_backup().await;
        let (v, br) = (id(VAULT), id(BROKER));
        b.log.hello(&br, &note);
        // The vault sends its event 3 changed: signed with its key, but
        // not the event acknowledged at index 3.
        let mut lying = kept(&full, VAULT, 3);
        lying[0].1 = event(&full.vault, 3, "rewritten", full.start);
        b.log.restore_entries(&v, lying).await.unwrap();
        let p = b
            .log
            .restore_entries(&br, kept(&full, BROKER, 3))
            .await
            .unwrap();
        assert_eq!((p.size, p.next_missing), (3, 3), "{p:?}");
        assert!(b.log.is_restoring());
        assert_eq!(b.log.store().size(), 3);
        let why = b.log.refuse_while_restoring().unwrap_err().to_string();
        assert!(why.contains("not the signed root"), "{why}");

        // Sent again as they were: complete.
        b.log
            .restore_entries(&v, kept(&full, VAULT, 3))
            .await
            .unwrap();
        let p = b
            .log
            .restore_entries(&br, kept(&full, BROKER, 3))
            .await
            .unwrap();
        assert_eq!(p.size, 8);
        assert_eq!(b.log.checkpoint().unwrap().note, note);
    }

    #[tokio::test]
    async fn a_source_can_send_only_its_own_events() {
        let (full, b, note) = full_and_backup().await;
        b.log.hello(&id(VAULT), &note);
        let err = b
            .log
            .restore_entries(&id(BROKER), kept(&full, VAULT, 3))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
        assert_eq!(b.log.restore_missing(), 5, "nothing of the call taken");
    }

    #[tokio::test]
    async fn only_a_checkpoint_this_log_signed_starts_a_restore() {
        let (_, b, note) = full_and_backup().await;
        // Same origin, size and root, another key: forged.
        let other = CheckpointSigner::new("t/audit", SigningKey::from_bytes(&[9; 32])).unwrap();
        let body = format!("{}\n", note.split_once("\n\n").unwrap().0);
        let body = Checkpoint::parse_body(&body).unwrap();
        let forged = other.sign(&body).unwrap();
        assert_eq!(b.log.hello(&id(VAULT), &forged), None);
        // A checkpoint it signed no larger than what it holds: nothing to do.
        let small = b.log.checkpoint().unwrap().note;
        assert_eq!(b.log.hello(&id(VAULT), &small), None);
        assert_eq!(b.log.hello(&id(VAULT), ""), None);
        assert!(!b.log.is_restoring());
        b.log
            .append(&id(VAULT), event(&b.vault, 3, "a", SystemTime::UNIX_EPOCH))
            .await
            .unwrap();
    }
}
