//! Receipts: what a source checks in the signed checkpoints the audit
//! service attaches to its acknowledgements, and what it keeps.
//!
//! The source keeps the last checkpoint it accepted (in memory and in its
//! outbox tree, so it survives restarts) and accepts the next one only if
//! it is signed by audit's checkpoint key, covers the acknowledged event and
//! extends the accepted one: same root at the same size, or a consistency
//! proof from it. A checkpoint of a smaller tree, another root at the same
//! size, or a proof that does not verify is an inconsistency: audit signed
//! two histories. [`ReceiptHealth`] then says so to the service (the vault
//! stops releasing, the broker stops changing state), the metric
//! `twokey.audit.receipt.inconsistent` reads 1 and an ERROR line names both
//! tree heads. It clears only when a checkpoint consistent with the last
//! accepted one is served again.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::watch;
use twokey_tlog::{
    checkpoint::{Checkpoint, NoteVerifier},
    cosignature::Cosigner,
    merkle::{self, Hash},
};

use crate::outbox::OutboxStore;

/// A tree head: size and root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Entries covered.
    pub size: u64,
    /// Their RFC 6962 root.
    pub root: Hash,
}

impl fmt::Display for Head {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.size, hex::encode(self.root))
    }
}

impl From<&Checkpoint> for Head {
    fn from(c: &Checkpoint) -> Self {
        Self {
            size: c.size,
            root: c.root,
        }
    }
}

/// Audit served a checkpoint inconsistent with one the source accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inconsistency {
    /// What audit served.
    pub served: Head,
    /// The last checkpoint the source accepted.
    pub accepted: Head,
    /// Why they are inconsistent.
    pub why: String,
}

impl fmt::Display for Inconsistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "audit served a checkpoint inconsistent with one it signed before: {} vs {} ({})",
            self.served, self.accepted, self.why
        )
    }
}

/// Whether audit's receipts are consistent, as the services read it before
/// releasing a code or changing state.
#[derive(Debug, Clone)]
pub struct ReceiptHealth(watch::Receiver<Option<Inconsistency>>);

impl ReceiptHealth {
    /// Always healthy (no receipts are checked).
    pub fn unchecked() -> Self {
        let (tx, rx) = watch::channel(None);
        // Keep the channel open so `changed` never fires.
        std::mem::forget(tx);
        Self(rx)
    }

    /// A health set by hand through the sender (tests, fakes).
    pub fn manual() -> (watch::Sender<Option<Inconsistency>>, Self) {
        let (tx, rx) = watch::channel(None);
        (tx, Self(rx))
    }

    /// The inconsistency in force, if any.
    pub fn inconsistency(&self) -> Option<Inconsistency> {
        self.0.borrow().clone()
    }

    /// `Err(message)` while an inconsistency is in force; the message names
    /// both tree heads and what it takes to clear, after `refused` (what
    /// the service does not do, e.g. "no code is released").
    pub fn check(&self, refused: &str) -> Result<(), String> {
        match &*self.0.borrow() {
            None => Ok(()),
            Some(i) => Err(format!(
                "audit served a checkpoint inconsistent with one it signed before: {} vs {}; \
                 {refused} until audit serves a checkpoint consistent with {} ({})",
                i.served, i.accepted, i.accepted, i.why
            )),
        }
    }

    /// Waits until the health changes.
    pub async fn changed(&mut self) {
        let _ = self.0.changed().await;
    }
}

/// Gauge `twokey.audit.receipt.inconsistent` per source.
fn observe(source: String, flag: Arc<AtomicU64>) {
    let attrs = [opentelemetry::KeyValue::new("source", source)];
    crate::metrics::meter()
        .u64_observable_gauge("twokey.audit.receipt.inconsistent")
        .with_description(
            "1 while audit's last checkpoint is inconsistent with one this source accepted before",
        )
        .with_unit("1")
        .with_callback(move |gauge| gauge.observe(flag.load(Ordering::Relaxed), &attrs))
        .build();
}

/// What a receipt did to the source's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted: the new last accepted checkpoint (its signed note).
    Accepted(Head),
    /// Inconsistent with the accepted one (the health is now flagged).
    Inconsistent(Inconsistency),
}

/// The source's receipt checker: audit's verifier key, the last accepted
/// checkpoint, and the health it reports.
#[derive(Debug)]
pub struct ReceiptChecker {
    verifier: NoteVerifier,
    accepted: Option<(Head, String)>,
    health: watch::Sender<Option<Inconsistency>>,
    flag: Arc<AtomicU64>,
    source: String,
    /// The source as a witness, if it cosigns.
    witness: Option<Cosigner>,
    /// The largest size cosigned by this process.
    cosigned: u64,
    /// A cosignature made and not yet sent.
    cosignature: Option<String>,
}

impl ReceiptChecker {
    /// A checker of `source`'s receipts with audit's checkpoint `verifier`,
    /// with no accepted checkpoint until [`ReceiptChecker::resume`], and the
    /// health it reports.
    pub fn new(verifier: NoteVerifier, source: String) -> (Self, ReceiptHealth) {
        let accepted = None;
        let (tx, rx) = watch::channel(None);
        let flag = Arc::new(AtomicU64::new(0));
        observe(source.clone(), flag.clone());
        (
            Self {
                verifier,
                accepted,
                health: tx,
                flag,
                source,
                witness: None,
                cosigned: 0,
                cosignature: None,
            },
            ReceiptHealth(rx),
        )
    }

    /// Starts from `kept`, the checkpoint the outbox kept (if it still
    /// verifies; otherwise from the next one audit serves).
    pub fn resume(&mut self, kept: Option<String>) {
        let verifier = &self.verifier;
        let source = &self.source;
        self.accepted = kept.and_then(|note| match verifier.open_checkpoint(&note) {
            Ok(c) => Some((Head::from(&c), note)),
            Err(e) => {
                tracing::warn!(
                    %source,
                    "the audit checkpoint this source kept does not verify with {verifier}: {e}; \
                     starting over from the next one audit serves"
                );
                None
            }
        });
    }

    /// Cosigns, as a witness, each checkpoint accepted with a size larger
    /// than the last it cosigned (so after checking its consistency with
    /// that one, as C2SP tlog-witness wants).
    pub fn with_witness(mut self, witness: Cosigner) -> Self {
        self.witness = Some(witness);
        self
    }

    /// The cosignature made for the last accepted checkpoint, if not taken
    /// yet: a signed note with the checkpoint's text and the cosignature
    /// line, for `AppendRequest.cosignature`.
    pub fn take_cosignature(&mut self) -> Option<String> {
        self.cosignature.take()
    }

    /// The size of the last accepted checkpoint (0: none).
    pub fn known_size(&self) -> u64 {
        self.accepted.as_ref().map_or(0, |(h, _)| h.size)
    }

    /// The last accepted checkpoint and its note.
    pub fn accepted(&self) -> Option<&(Head, String)> {
        self.accepted.as_ref()
    }

    /// Flags `found`: health, metric, and an ERROR line when it is new.
    fn raise(&self, found: &Inconsistency) {
        let fresh = self.health.borrow().as_ref() != Some(found);
        if fresh {
            tracing::error!(
                source = %self.source,
                served = %found.served,
                accepted = %found.accepted,
                "{found}; this source stops until audit serves a checkpoint consistent with {}",
                found.accepted
            );
        }
        self.flag.store(1, Ordering::Relaxed);
        self.health.send_replace(Some(found.clone()));
    }

    /// Audit answered that it holds only `holds` entries, fewer than a
    /// checkpoint it signed, and is restoring the rest from the sources:
    /// a shorter log, flagged like an inconsistency (its root is unknown
    /// and shown as zeros) until a consistent checkpoint is served again.
    /// Nothing is flagged when no checkpoint was accepted yet.
    pub fn restoring(&mut self, holds: u64) -> Option<Inconsistency> {
        let (accepted, _) = self.accepted.as_ref()?;
        let found = Inconsistency {
            served: Head {
                size: holds,
                root: [0; 32],
            },
            accepted: *accepted,
            why: format!(
                "audit holds only {holds} entries, a smaller tree, and is restoring the rest from \
                 the events its sources kept"
            ),
        };
        self.raise(&found);
        Some(found)
    }

    /// Checks a receipt: `note` for the acknowledgement of the entry at
    /// `covers` (none for a GAP), with `proof` from the accepted size. A note that does
    /// not verify or does not cover the entry is an error (nothing changes);
    /// otherwise the verdict, already applied (accepted checkpoint kept in
    /// `outbox`, health set or cleared, logs and metric).
    pub async fn check<O: OutboxStore>(
        &mut self,
        outbox: &O,
        note: &str,
        covers: Option<u64>,
        proof: &[Vec<u8>],
    ) -> Result<Verdict, String> {
        let checkpoint = self
            .verifier
            .open_checkpoint(note)
            .map_err(|e| format!("audit sent a receipt that does not verify: {e}"))?;
        let served = Head::from(&checkpoint);
        let inconsistent = |why: String| {
            self.accepted.as_ref().map(|(accepted, _)| Inconsistency {
                served,
                accepted: *accepted,
                why,
            })
        };
        let found = match &self.accepted {
            None => None,
            Some((accepted, _)) if served.size < accepted.size => {
                inconsistent("a smaller tree".into())
            }
            Some((accepted, _)) if served.size == accepted.size => (served.root != accepted.root)
                .then(|| inconsistent("another root at the same size".into()))
                .flatten(),
            Some((accepted, _)) => {
                let checked = merkle::hashes_from_bytes(proof).and_then(|p| {
                    merkle::verify_consistency(
                        accepted.size,
                        served.size,
                        &p,
                        &accepted.root,
                        &served.root,
                    )
                });
                checked
                    .err()
                    .and_then(|e| inconsistent(format!("the consistency proof fails: {e}")))
            }
        };
        if let Some(found) = found {
            self.raise(&found);
            return Ok(Verdict::Inconsistent(found));
        }
        if let Some(leaf_index) = covers
            && served.size <= leaf_index
        {
            return Err(format!(
                "audit acknowledged entry {leaf_index} with a checkpoint of {} entries, which does \
                 not hold it",
                served.size
            ));
        }
        if self.health.borrow().is_some() {
            tracing::info!(
                source = %self.source,
                served = %served,
                "audit serves a checkpoint consistent with the last accepted one again"
            );
        }
        self.flag.store(0, Ordering::Relaxed);
        self.health.send_if_modified(|h| h.take().is_some());
        if self
            .accepted
            .as_ref()
            .is_none_or(|(h, _)| h.size < served.size)
        {
            if let Err(e) = outbox.set_accepted_checkpoint(note).await {
                tracing::warn!(source = %self.source, "cannot keep the accepted audit checkpoint: {e}");
            }
            self.accepted = Some((served, note.to_owned()));
        }
        if let Some(witness) = &self.witness
            && served.size > self.cosigned
            && let Some(text) = note.find("\n\n").map(|i| &note[..=i])
        {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            match witness.cosign(text, now) {
                Ok(line) => {
                    self.cosignature = Some(format!("{text}\n{line}\n"));
                    self.cosigned = served.size;
                }
                Err(e) => tracing::warn!(source = %self.source, "cannot cosign: {e}"),
            }
        }
        Ok(Verdict::Accepted(served))
    }
}
