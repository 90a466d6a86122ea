//! The reconciler (issue 20, docs/RECONCILE.md): CloudTrail root sign-ins
//! and MFA device changes, read from a synced trail directory and from
//! EventBridge posts, matched against the vault's `code.released` events in
//! this log, each finding appended to the log as a signed event of the
//! reconciler's own source (`[reconcile] source_id`), through the same
//! verification and append path as any source's event.
//!
//! The account mapping comes from the log too: the `aws_accounts` attribute
//! of the vault's latest `policy.applied` event (the admin-signed policy),
//! never from a file. A finding is written once (keyed by CloudTrail
//! `eventID`, or by the release's leaf index for an unused one); releases
//! whose window is still open stay pending across passes and restarts
//! ([`state`]). No tonic here: the HTTP edge is `crate::http`.

pub mod state;

use std::{
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use ed25519_dalek::SigningKey;
use opentelemetry::{KeyValue, metrics::Counter};
use prost::Message;
use time::OffsetDateTime;
use tokio::sync::Notify;
use twokey_proto::audit::v1::{Outcome, SignedEvent};
use twokey_reconcile::{
    cloudtrail::{self, Event as TrailEvent, ReadOptions, Skip},
    matching::{Accounts, Finding, Release, reconcile},
};
use twokey_runtime::{
    SpiffeId,
    durable::StoreError,
    events::{EventDraft, EventSigner},
    metrics::counter,
    time::Clock,
};

use crate::{
    error::AuditError,
    service::{Ack, AuditLog, QueryFilter},
    store::LogStore,
};
use state::{Changes, ReconcileState};

/// The action prefix of every finding event.
pub const ACTION_PREFIX: &str = "reconcile.";

/// Entries read per query step.
const BATCH: usize = 500;

/// Why a pass or an accepted post failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The reconciler's own state.
    #[error("reconciler state: {0}")]
    State(#[from] StoreError),
    /// The log.
    #[error("audit log: {0}")]
    Log(#[from] AuditError),
    /// The log refused a finding.
    #[error("the log did not take finding seq {seq}: {why}")]
    Refused {
        /// The finding's sequence number.
        seq: u64,
        /// Why.
        why: String,
    },
}

/// The reconciler's settings, from `[reconcile]`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The source identity of the findings.
    pub source: SpiffeId,
    /// Its event signing key.
    pub key: SigningKey,
    /// The vault whose events are read.
    pub vault: SpiffeId,
    /// The synced trail directory, if any.
    pub cloudtrail_dir: Option<PathBuf>,
    /// How late CloudTrail may deliver a record.
    pub delivery_delay: Duration,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Findings written, by kind name.
    pub written: Vec<(String, String)>,
    /// Events read (files and posts).
    pub events: usize,
    /// Files and records skipped.
    pub skipped: usize,
}

/// An EventBridge post, as taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Kept durably for the next pass, under its CloudTrail `eventID`.
    Kept(String),
    /// Well-formed, but not a record reconciliation reads.
    Ignored,
}

/// The reconciler over an audit log.
pub struct Reconciler<S> {
    log: Arc<AuditLog<S>>,
    state: ReconcileState,
    signer: EventSigner,
    vault: SpiffeId,
    dir: Option<PathBuf>,
    delivery_delay: Duration,
    clock: Arc<dyn Clock>,
    one_pass: tokio::sync::Mutex<()>,
    wake: Notify,
}

impl<S> std::fmt::Debug for Reconciler<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("source", self.signer.source())
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn datetime(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

struct Counters {
    findings: Counter<u64>,
    skipped: Counter<u64>,
}

fn counters() -> &'static Counters {
    static COUNTERS: OnceLock<Counters> = OnceLock::new();
    COUNTERS.get_or_init(|| Counters {
        findings: counter(
            "twokey.audit.reconcile.findings",
            "reconciliation findings written to the log, by kind",
            "{finding}",
        ),
        skipped: counter(
            "twokey.audit.reconcile.skipped",
            "CloudTrail files, records and posts skipped, by reason",
            "{record}",
        ),
    })
}

/// The key that makes a finding unique.
fn finding_key(f: &Finding) -> String {
    match f {
        Finding::Matched { sign_in, .. }
        | Finding::Unexplained { sign_in, .. }
        | Finding::Unprotected { sign_in, .. }
        | Finding::Failed { sign_in, .. } => format!("ct:{}", sign_in.event_id),
        Finding::OutOfBand { change, .. } => format!("ct:{}", change.event_id),
        Finding::Unused { release } => format!("rel:{}", release_index(release)),
    }
}

/// `index:request_id`, as the reconciler names releases.
fn release_index(r: &Release) -> &str {
    r.id.split_once(':').map_or(r.id.as_str(), |(i, _)| i)
}

fn release_request(r: &Release) -> &str {
    r.id.split_once(':').map_or("", |(_, req)| req)
}

/// The event draft of a finding.
pub fn finding_draft(source: &SpiffeId, accounts: &Accounts, f: &Finding) -> EventDraft {
    let kind = f.kind();
    let aws = |a: &str| {
        accounts
            .iter()
            .find(|(_, m)| m.account == a)
            .map(|(aws, _)| aws.to_owned())
            .unwrap_or_default()
    };
    let mut d = EventDraft::new(source.as_str(), format!("{ACTION_PREFIX}{}", kind.as_str()))
        .account(f.account())
        .outcome(if kind.alerts() {
            Outcome::Failure
        } else {
            Outcome::Success
        })
        .attr("aws_account_id", aws(f.account()))
        .attr("event_time", rfc3339(f.time()));
    let sign_in = match f {
        Finding::Matched { sign_in, .. }
        | Finding::Unexplained { sign_in, .. }
        | Finding::Unprotected { sign_in, .. }
        | Finding::Failed { sign_in, .. } => Some(sign_in),
        _ => None,
    };
    if let Some(s) = sign_in {
        d = d
            .attr("cloudtrail_event_id", s.event_id.clone())
            .attr("source_ip", s.source_ip.clone().unwrap_or_default());
        if let cloudtrail::SignInOutcome::Failure {
            error_message: Some(m),
        } = &s.outcome
        {
            d = d.attr("error_message", m.clone());
        }
    }
    match f {
        Finding::Matched { release, .. } | Finding::Unused { release } => {
            d = d
                .request(release_request(release))
                .attr("release_leaf_index", release_index(release))
                .attr("released_at", rfc3339(release.at));
        }
        Finding::OutOfBand { change, .. } => {
            d = d
                .attr("cloudtrail_event_id", change.event_id.clone())
                .attr("source_ip", change.source_ip.clone().unwrap_or_default())
                .attr("mfa_action", change.action.event_name())
                .attr("identity_type", change.identity_type.clone());
            if let Some(m) = &change.error_message {
                d = d.attr("error_message", m.clone());
            }
        }
        _ => {}
    }
    d
}

impl<S: LogStore> Reconciler<S> {
    /// The reconciler of `log` with its state in `state`.
    pub fn new(
        log: Arc<AuditLog<S>>,
        state: ReconcileState,
        settings: Settings,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ReconcileError> {
        let signer = EventSigner::new(settings.source, settings.key);
        let expected = log.store().next_seq(signer.source().as_str())?;
        state.raise_next_seq(expected)?;
        Ok(Self {
            log,
            state,
            signer,
            vault: settings.vault,
            dir: settings.cloudtrail_dir,
            delivery_delay: settings.delivery_delay,
            clock,
            one_pass: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
        })
    }

    /// The public key the findings are signed with.
    pub fn verifying_key(&self) -> ed25519_dalek::VerifyingKey {
        self.signer.verifying_key()
    }

    /// Checks an EventBridge post and keeps it durably for the next pass,
    /// which it wakes. A post that is not a CloudTrail event reconciliation
    /// reads is refused with the reason; one of another kind is ignored.
    pub async fn accept_eventbridge(&self, body: &[u8]) -> Result<Accepted, AcceptError> {
        let options = ReadOptions::at(datetime(self.clock.now()));
        match cloudtrail::parse_eventbridge(body, &options) {
            Ok(None) => Ok(Accepted::Ignored),
            Err(reason) => {
                counters()
                    .skipped
                    .add(1, &[KeyValue::new("reason", reason.label())]);
                Err(AcceptError::Invalid(reason))
            }
            Ok(Some(event)) => {
                let id = event.event_id().to_owned();
                self.state.put_inbox(&id, body).await?;
                self.wake.notify_one();
                Ok(Accepted::Kept(id))
            }
        }
    }

    /// Runs passes every `interval`, and when a post arrives, until the
    /// process ends. A failed pass is logged and tried again next time.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let mut every = tokio::time::interval(interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                () = self.wake.notified() => {}
            }
            if let Err(e) = self.pass().await {
                tracing::error!("reconcile pass failed, tried again at the next scan: {e}");
            }
        }
    }

    /// The mapping named by the vault's latest `policy.applied`.
    fn mapping(&self) -> Result<Accounts, ReconcileError> {
        let filter = QueryFilter {
            source: self.vault.to_string(),
            action: "policy.applied".into(),
            newest_first: true,
            ..QueryFilter::default()
        };
        let batch = self.log.query_batch(&filter, None, 1)?;
        let Some(event) = batch.entries.first().and_then(|e| e.event.as_ref()) else {
            return Ok(Accounts::new());
        };
        let attr = event
            .attributes
            .get("aws_accounts")
            .map_or("", String::as_str);
        Accounts::from_policy_attr(attr).or_else(|e| {
            tracing::error!(
                policy_version = event
                    .attributes
                    .get("policy_version")
                    .map_or("", String::as_str),
                "the latest policy.applied maps no account: {e}"
            );
            Ok(Accounts::new())
        })
    }

    /// The vault's `code.released` events from leaf index `from` up to the
    /// log's size `to`, as releases named `index:request_id`.
    fn releases(&self, from: u64, to: u64) -> Result<Vec<Release>, ReconcileError> {
        let filter = QueryFilter {
            source: self.vault.to_string(),
            action: "code.released".into(),
            ..QueryFilter::default()
        };
        let mut out = Vec::new();
        let mut cursor = Some(from);
        while let Some(start) = cursor.filter(|&c| c < to) {
            let batch = self.log.query_batch(&filter, Some(start), BATCH)?;
            for entry in batch.entries.iter().filter(|e| e.index < to) {
                let Some(event) = entry.event.as_ref() else {
                    continue;
                };
                let Some(at) = event
                    .time
                    .as_ref()
                    .and_then(twokey_runtime::time::from_timestamp)
                else {
                    continue;
                };
                out.push(Release {
                    account: event.account_id.clone(),
                    at: datetime(at),
                    id: format!("{}:{}", entry.index, event.request_id),
                });
            }
            cursor = batch.next;
        }
        Ok(out)
    }

    /// Appends the findings not yet acknowledged, in order.
    async fn flush_outbox(&self) -> Result<(), ReconcileError> {
        for (seq, bytes) in self.state.outbox()? {
            let signed =
                SignedEvent::decode(bytes.as_slice()).map_err(|e| ReconcileError::Refused {
                    seq,
                    why: format!("kept finding does not decode: {e}"),
                })?;
            match self.log.append(self.signer.source(), signed).await? {
                Ack::Stored { .. } | Ack::Duplicate { .. } => self.state.outbox_done(seq)?,
                Ack::Gap { expected, .. } => {
                    return Err(ReconcileError::Refused {
                        seq,
                        why: format!("the log expects seq {expected}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// One pass: new files and posts against the pending releases; each new
    /// finding signed, kept, then appended to the log.
    pub async fn pass(&self) -> Result<PassReport, ReconcileError> {
        let _one = self.one_pass.lock().await;
        self.flush_outbox().await?;
        let now = datetime(self.clock.now());
        let options = ReadOptions::at(now);
        let accounts = self.mapping()?;
        let mut report = PassReport::default();
        let mut changes = Changes::default();

        // Releases: those pending, and the new ones.
        let size = self.log.size();
        let cursor = self.state.release_cursor()?;
        let before = self.state.pending()?;
        let mut releases = before.clone();
        releases.extend(self.releases(cursor, size)?);
        changes.release_cursor(size.max(cursor));

        // Events: new files, then accepted posts.
        let mut events: Vec<TrailEvent> = Vec::new();
        let mut problems = Vec::new();
        if let Some(dir) = self.dir.clone() {
            let mut seen = self.state.seen()?;
            let known = seen.clone();
            let scanned = tokio::task::spawn_blocking(move || {
                let scan = cloudtrail::scan(&dir, &mut seen, &options);
                (scan, seen)
            })
            .await
            .map_err(|e| ReconcileError::Refused {
                seq: 0,
                why: format!("scan task failed: {e}"),
            })?;
            match scanned {
                (Ok(scan), seen) => {
                    for (path, size) in seen.iter() {
                        if !known.contains(path, size) {
                            changes.seen(path, size);
                        }
                    }
                    events.extend(scan.events);
                    problems.extend(scan.problems);
                }
                (Err(e), _) => tracing::warn!("{e}"),
            }
        }
        for (key, body) in self.state.inbox()? {
            match cloudtrail::parse_eventbridge(&body, &options) {
                Ok(Some(event)) => events.push(event),
                Ok(None) => {}
                Err(reason) => problems.push(cloudtrail::Problem {
                    path: PathBuf::from("eventbridge"),
                    record: None,
                    reason,
                }),
            }
            changes.inbox_done(&key);
        }
        for p in &problems {
            tracing::warn!(problem = %p, "CloudTrail input skipped");
            counters()
                .skipped
                .add(1, &[KeyValue::new("reason", p.reason.label())]);
        }
        report.skipped = problems.len();
        report.events = events.len();
        // A record already found on (from a file and a post) counts once.
        let mut fresh = Vec::with_capacity(events.len());
        for e in events {
            if !self.state.has_finding(&format!("ct:{}", e.event_id()))? {
                fresh.push(e);
            }
        }

        let complete_until = now - self.delivery_delay;
        let out = reconcile(&accounts, &fresh, &releases, complete_until);
        let ignored = out.ignored;
        for (reason, n) in [
            ("duplicate_event", ignored.duplicate_events),
            ("unmapped_account", ignored.unmapped_events),
            ("not_root", ignored.non_root_sign_ins),
        ] {
            if n > 0 {
                counters()
                    .skipped
                    .add(n, &[KeyValue::new("reason", reason)]);
            }
        }
        let mut seq = self.state.next_seq()?;
        let mut written = Vec::new();
        for f in &out.findings {
            let key = finding_key(f);
            if self.state.has_finding(&key)? || written.iter().any(|(k, _)| *k == key) {
                continue;
            }
            let event = finding_draft(self.signer.source(), &accounts, f).into_event(
                self.signer.source(),
                seq,
                self.clock.now(),
            );
            let signed = self.signer.sign(&event);
            changes.finding(&key, seq, &signed.encode_to_vec());
            seq += 1;
            written.push((key, f.kind()));
        }
        changes.pending(&before, &out.pending);
        self.state.commit(changes).await?;
        for (key, kind) in &written {
            counters()
                .findings
                .add(1, &[KeyValue::new("kind", kind.as_str())]);
            report.written.push((kind.as_str().to_owned(), key.clone()));
        }
        if !written.is_empty() {
            tracing::info!(findings = written.len(), "reconcile findings written");
        }
        self.flush_outbox().await?;
        Ok(report)
    }
}

/// Why an EventBridge post was not taken.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// Not a CloudTrail event reconciliation can read.
    #[error("{0}")]
    Invalid(Skip),
    /// Not kept: storage failed.
    #[error("cannot keep the event: {0}")]
    State(#[from] StoreError),
}

#[cfg(test)]
mod tests;
