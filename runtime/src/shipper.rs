//! The shipper: streams a source's outbox to the audit service over the
//! `Append` stream, reconnecting with backoff, and drops each event only once
//! the audit service has acknowledged it as stored. It also measures what
//! the metrics report: outbox depth and acknowledgement latency.
//!
//! With audit's checkpoint key ([`ShipperOptions::audit_key`]) it checks
//! receipts ([`crate::receipts`]): an event counts as acknowledged (dropped
//! from the outbox, and [`ShipperHandle::wait_acked`] returns) only once a
//! receipt that covers it was accepted; a receipt inconsistent with the
//! last accepted checkpoint flags [`ReceiptHealth`] and ends the stream,
//! which is retried with backoff and checked again. Without the key, acks
//! are taken as they come (and a WARN at start says so).
//!
//! With the key the source is also a witness: each stream opens with a
//! request without an event (the accepted size; audit answers with a
//! receipt), and each checkpoint accepted with a larger size than the last
//! cosigned is cosigned ([`crate::events::EventSigner::cosigner`]) and the
//! cosignature sent on the stream in a request without an event. Audit
//! pushes a receipt to idle streams whenever it signs a larger checkpoint,
//! so both sources cosign the latest one soon after the log goes quiet.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use twokey_proto::audit::v1::{
    AppendRequest, AppendStatus, Event, Outcome, audit_service_client::AuditServiceClient,
};

use twokey_tlog::checkpoint::NoteVerifier;

use crate::{
    outbox::Outbox,
    receipts::{ReceiptChecker, ReceiptHealth, Verdict},
};

/// Events sent but not yet acknowledged, at most.
const WINDOW: usize = 256;
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The audit service did not acknowledge an event in time.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("audit unavailable: event {0} not acknowledged in time")]
pub struct AckTimeout(pub u64);

/// Lets callers wait until their event is acknowledged.
#[derive(Debug, Clone)]
pub struct ShipperHandle {
    acked: watch::Receiver<u64>,
    receipts: ReceiptHealth,
}

/// How the shipper checks what audit answers.
#[derive(Debug, Clone, Default)]
pub struct ShipperOptions {
    /// Audit's checkpoint verifier key: receipts are checked when set.
    pub audit_key: Option<NoteVerifier>,
}

impl ShipperOptions {
    /// The options from a service's `audit_checkpoint_key` setting: receipts
    /// are checked against the key when it is set; without it a WARN says
    /// that they are not. A key that does not parse is an error naming it.
    pub fn from_setting(audit_checkpoint_key: Option<&str>) -> Result<Self, String> {
        let Some(key) = audit_checkpoint_key
            .map(str::trim)
            .filter(|k| !k.is_empty())
        else {
            tracing::warn!(
                "no audit_checkpoint_key: audit's receipts are not checked, so a rolled-back or \
                 forked audit log goes unnoticed here; set it to the verifier key twokey-audit \
                 prints at start (`verifier=...`)"
            );
            return Ok(Self::default());
        };
        let key = NoteVerifier::parse(key).map_err(|e| format!("audit_checkpoint_key: {e}"))?;
        Ok(Self {
            audit_key: Some(key),
        })
    }
}

impl ShipperHandle {
    /// Whether audit's receipts are consistent (always, without a key).
    pub fn receipts(&self) -> &ReceiptHealth {
        &self.receipts
    }

    /// The highest sequence number acknowledged so far.
    pub fn acked(&self) -> u64 {
        *self.acked.borrow()
    }

    /// Waits until event `seq` is acknowledged, at most `timeout`.
    pub async fn wait_acked(&self, seq: u64, timeout: Duration) -> Result<(), AckTimeout> {
        let mut rx = self.acked.clone();
        match tokio::time::timeout(timeout, rx.wait_for(|acked| *acked >= seq)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(AckTimeout(seq)),
        }
    }
}

/// Starts shipping `outbox` to the audit service at the other end of `channel`.
pub fn spawn_shipper(outbox: Outbox, channel: Channel) -> ShipperHandle {
    spawn_shipper_task(outbox, channel).0
}

/// Like [`spawn_shipper`], also returning the task so a server can stop it
/// (abort, then await) on shutdown and release the database.
pub fn spawn_shipper_task(
    outbox: Outbox,
    channel: Channel,
) -> (ShipperHandle, tokio::task::JoinHandle<()>) {
    spawn_shipper_with(outbox, channel, ShipperOptions::default())
}

/// Like [`spawn_shipper_task`], checking receipts as `options` say.
pub fn spawn_shipper_with(
    outbox: Outbox,
    channel: Channel,
    options: ShipperOptions,
) -> (ShipperHandle, tokio::task::JoinHandle<()>) {
    let (mut checker, receipts) = match options.audit_key {
        Some(key) => {
            let (c, h) = ReceiptChecker::new(key, &outbox);
            (Some(c.with_witness(outbox.signer().cosigner())), h)
        }
        None => (None, ReceiptHealth::unchecked()),
    };
    let start = outbox
        .first_pending()
        .unwrap_or_else(|| outbox.next_seq())
        .saturating_sub(1);
    let (acked_tx, acked_rx) = watch::channel(start);
    let depth = Arc::new(AtomicU64::new(0));
    {
        let depth = depth.clone();
        crate::metrics::observe_outbox_depth(outbox.signer().source().to_string(), move || {
            depth.load(Ordering::Relaxed) as usize
        });
    }
    let task = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(50);
        loop {
            update_depth(&outbox, &acked_tx, &depth);
            let checker = checker.as_mut();
            match session(
                &outbox,
                channel.clone(),
                &acked_tx,
                &mut backoff,
                &depth,
                checker,
            )
            .await
            {
                Ok(()) => {}
                Err(why) => {
                    tracing::warn!(
                        source = %outbox.signer().source(),
                        depth = outbox.depth(),
                        "audit shipping paused: {why}"
                    );
                }
            }
            // Retry after the backoff, or at once when a new event arrives.
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = outbox.notified() => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    });
    (
        ShipperHandle {
            acked: acked_rx,
            receipts,
        },
        task,
    )
}

/// Events written and not yet acknowledged: the sequence numbers above the
/// acknowledged one.
fn update_depth(outbox: &Outbox, acked: &watch::Sender<u64>, depth: &AtomicU64) {
    let written = outbox.next_seq().saturating_sub(1);
    depth.store(written.saturating_sub(*acked.borrow()), Ordering::Relaxed);
}

/// An event on its way: when it was sent, and what it was (for metrics).
struct Sent {
    seq: u64,
    at: Instant,
    event: Option<Event>,
}

/// Reports the events acknowledged through `seq` to the metrics and the
/// outbox's observer.
fn acknowledged(outbox: &Outbox, sent: &mut VecDeque<Sent>, seq: u64) {
    let source = outbox.signer().source().to_string();
    while sent.front().is_some_and(|s| s.seq <= seq) {
        let Some(s) = sent.pop_front() else { break };
        let Some(event) = s.event else { continue };
        let outcome = Outcome::try_from(event.outcome)
            .map(|o| {
                o.as_str_name()
                    .trim_start_matches("OUTCOME_")
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        crate::metrics::event_acknowledged(&source, &event.action, &outcome, s.at.elapsed());
        outbox.observe_acked(&event);
    }
}

async fn session(
    outbox: &Outbox,
    channel: Channel,
    acked: &watch::Sender<u64>,
    backoff: &mut Duration,
    depth: &AtomicU64,
    mut checker: Option<&mut ReceiptChecker>,
) -> Result<(), String> {
    let known = checker.as_ref().map_or(0, |c| c.known_size());
    let mut sent = VecDeque::new();
    let (tx, rx) = mpsc::channel::<AppendRequest>(WINDOW);
    let mut client = AuditServiceClient::new(channel)
        .max_decoding_message_size(crate::serve::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::serve::MAX_MESSAGE_BYTES);
    let mut next = outbox.first_pending().unwrap_or_else(|| outbox.next_seq());
    let mut in_flight = 0usize;
    if checker.is_some() {
        // Hello: the size of the checkpoint accepted last, and a receipt now
        // (the source, as a witness, sees the latest checkpoint at once).
        tx.send(AppendRequest {
            known_size: known,
            ..Default::default()
        })
        .await
        .map_err(|_| "append stream closed")?;
    }
    // Queue the first events before opening the stream so the open carries them.
    queue(outbox, &tx, &mut next, &mut in_flight, &mut sent, known).await?;
    let mut responses = client
        .append(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    loop {
        queue(outbox, &tx, &mut next, &mut in_flight, &mut sent, known).await?;
        tokio::select! {
            message = responses.message() => {
                let response = message
                    .map_err(|s| format!("{}: {}", s.code(), s.message()))?
                    .ok_or("audit closed the stream")?;
                let status = AppendStatus::try_from(response.status);
                if status == Ok(AppendStatus::Unspecified) && !response.checkpoint.is_empty() {
                    // A receipt alone: no event answered.
                    if let Some(c) = checker.as_deref_mut() {
                        if let Verdict::Inconsistent(i) =
                            c.check(outbox, &response.checkpoint, None, &response.consistency_proof)?
                        {
                            return Err(i.to_string());
                        }
                        send_cosignature(c, &tx);
                    }
                    continue;
                }
                in_flight = in_flight.saturating_sub(1);
                match status {
                    Ok(AppendStatus::Stored | AppendStatus::Duplicate) => {
                        if let Some(c) = checker.as_deref_mut() {
                            if response.checkpoint.is_empty() {
                                // Covered by the next receipt on this stream.
                                continue;
                            }
                            let verdict = c.check(
                                outbox,
                                &response.checkpoint,
                                Some(response.leaf_index),
                                &response.consistency_proof,
                            )?;
                            if let Verdict::Inconsistent(i) = verdict {
                                return Err(i.to_string());
                            }
                            send_cosignature(c, &tx);
                        }
                        outbox.remove_through(response.seq).map_err(|e| e.to_string())?;
                        acked.send_if_modified(|a| {
                            let changed = response.seq > *a;
                            *a = (*a).max(response.seq);
                            changed
                        });
                        acknowledged(outbox, &mut sent, response.seq);
                        update_depth(outbox, acked, depth);
                        *backoff = Duration::from_millis(50);
                    }
                    Ok(AppendStatus::Gap) => {
                        if let Some(c) = checker.as_deref_mut()
                            && !response.checkpoint.is_empty()
                            && let Verdict::Inconsistent(i) = c.check(
                                outbox,
                                &response.checkpoint,
                                None,
                                &response.consistency_proof,
                            )?
                        {
                            return Err(i.to_string());
                        }
                        // Everything below expected_seq is stored; start over from there.
                        let stored = response.expected_seq.saturating_sub(1);
                        outbox.remove_through(stored).map_err(|e| e.to_string())?;
                        return Err(format!("audit expects event {} next; resending", response.expected_seq));
                    }
                    _ => return Err(format!("unexpected append status {}", response.status)),
                }
            }
            () = outbox.notified() => update_depth(outbox, acked, depth),
        }
    }
}

/// Sends the cosignature of the checkpoint just accepted, if one is due;
/// dropped if the stream is full (the next larger checkpoint is cosigned).
fn send_cosignature(checker: &mut ReceiptChecker, tx: &mpsc::Sender<AppendRequest>) {
    if let Some(cosignature) = checker.take_cosignature() {
        let _ = tx.try_send(AppendRequest {
            cosignature,
            ..Default::default()
        });
    }
}

async fn queue(
    outbox: &Outbox,
    tx: &mpsc::Sender<AppendRequest>,
    next: &mut u64,
    in_flight: &mut usize,
    sent: &mut VecDeque<Sent>,
    known_size: u64,
) -> Result<(), String> {
    if *in_flight >= WINDOW {
        return Ok(());
    }
    for (seq, event) in outbox.pending(*next, WINDOW - *in_flight) {
        sent.push_back(Sent {
            seq,
            at: Instant::now(),
            event: Event::decode(event.event.as_slice()).ok(),
        });
        tx.send(AppendRequest {
            event: Some(event),
            known_size,
            ..Default::default()
        })
        .await
        .map_err(|_| "append stream closed")?;
        *next = seq + 1;
        *in_flight += 1;
    }
    Ok(())
}
