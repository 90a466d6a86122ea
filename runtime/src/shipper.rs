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
//! Acknowledged events are not dropped but kept (see [`crate::outbox`])
//! for [`ShipperOptions::keep`]: audit restored from an older backup asks
//! for them (status RESTORE, answered with a `Restore` call of the kept
//! events at their leaf indices), and a GAP puts them back to be sent
//! again. A source whose shipping keeps failing for a minute says so at
//! ERROR every minute, with the gauge `twokey.audit.shipping.stalled`.
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
    AppendRequest, AppendStatus, Event, Outcome, RestoreRequest, RestoreResponse,
    audit_service_client::AuditServiceClient,
};

use twokey_tlog::checkpoint::NoteVerifier;

use crate::{
    outbox::{OutboxStore, RequeueError},
    receipts::{ReceiptChecker, ReceiptHealth, Verdict},
};

/// Events sent but not yet acknowledged, at most.
const WINDOW: usize = 256;
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long shipping may keep failing before it is an alarm, and how often
/// the alarm repeats.
const STALL_ALARM: Duration = Duration::from_secs(60);
/// How often kept events past the retention are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Kept events sent per step of a `Restore` call.
const RESTORE_BATCH: usize = 256;
/// Days acknowledged events are kept by default (`audit_keep_days`).
pub const DEFAULT_KEEP_DAYS: u64 = 30;

/// The audit service did not acknowledge an event in time.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("audit unavailable: event {0} not acknowledged in time")]
pub struct AckTimeout(pub u64);

/// Lets callers wait until their event is acknowledged.
#[derive(Debug, Clone)]
pub struct ShipperHandle {
    acked: watch::Receiver<u64>,
    receipts: ReceiptHealth,
    stalled: Stalled,
}

/// Why shipping has failed for longer than the alarm's delay, while it has.
type Stalled = Arc<std::sync::Mutex<Option<String>>>;

/// How the shipper checks what audit answers, and what it keeps.
#[derive(Debug, Clone)]
pub struct ShipperOptions {
    /// Audit's checkpoint verifier key: receipts are checked when set.
    pub audit_key: Option<NoteVerifier>,
    /// How long acknowledged events are kept for an audit service restored
    /// from a backup.
    pub keep: Duration,
    /// How long shipping may keep failing before it is an alarm (ERROR
    /// line, gauge), and how often the ERROR line repeats.
    pub stall_alarm: Duration,
    /// Audit's replicas: after a failed stream the next one runs on a new
    /// connection, which starts at the next replica (an audit replica that
    /// is not the sequencer refuses appends on a live connection). Without
    /// it every stream runs on the one channel given.
    pub reconnect: Option<crate::tls::Peer>,
}

impl Default for ShipperOptions {
    fn default() -> Self {
        Self {
            audit_key: None,
            keep: Duration::from_secs(DEFAULT_KEEP_DAYS * 86_400),
            stall_alarm: STALL_ALARM,
            reconnect: None,
        }
    }
}

impl ShipperOptions {
    /// The options from a service's `audit_checkpoint_key` and
    /// `audit_keep_days` settings: receipts are checked against the key
    /// when it is set; without it a WARN says that they are not. A key that
    /// does not parse is an error naming it.
    pub fn from_setting(
        audit_checkpoint_key: Option<&str>,
        keep_days: u64,
    ) -> Result<Self, String> {
        let keep = Duration::from_secs(keep_days.saturating_mul(86_400));
        let Some(key) = audit_checkpoint_key
            .map(str::trim)
            .filter(|k| !k.is_empty())
        else {
            tracing::warn!(
                "no audit_checkpoint_key: audit's receipts are not checked, so a rolled-back or \
                 forked audit log goes unnoticed here, and an audit service restored from a \
                 backup cannot ask this source for what it lost; set it to the verifier key \
                 twokey-audit prints at start (`verifier=...`)"
            );
            return Ok(Self {
                keep,
                ..Self::default()
            });
        };
        let key = NoteVerifier::parse(key).map_err(|e| format!("audit_checkpoint_key: {e}"))?;
        Ok(Self {
            audit_key: Some(key),
            keep,
            ..Self::default()
        })
    }
}

impl ShipperHandle {
    /// Whether audit's receipts are consistent (always, without a key).
    pub fn receipts(&self) -> &ReceiptHealth {
        &self.receipts
    }

    /// Why shipping has kept failing for longer than
    /// [`ShipperOptions::stall_alarm`] (the last reason), while it has.
    pub fn stalled(&self) -> Option<String> {
        self.stalled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
pub fn spawn_shipper<O: OutboxStore>(outbox: O, channel: Channel) -> ShipperHandle {
    spawn_shipper_task(outbox, channel).0
}

/// Like [`spawn_shipper`], also returning the task so a server can stop it
/// (abort, then await) on shutdown and release the database.
pub fn spawn_shipper_task<O: OutboxStore>(
    outbox: O,
    channel: Channel,
) -> (ShipperHandle, tokio::task::JoinHandle<()>) {
    spawn_shipper_with(outbox, channel, ShipperOptions::default())
}

/// Like [`spawn_shipper_task`], checking receipts as `options` say.
///
/// The outbox is read in the task: the acknowledged sequence number starts
/// at 0 and is set to the one below the oldest waiting event (and the
/// accepted checkpoint loaded) as soon as the outbox answers; while it does
/// not, shipping is paused and retried like a failed stream.
pub fn spawn_shipper_with<O: OutboxStore>(
    outbox: O,
    channel: Channel,
    options: ShipperOptions,
) -> (ShipperHandle, tokio::task::JoinHandle<()>) {
    let source = outbox.signer().source().to_string();
    let (mut checker, receipts) = match options.audit_key {
        Some(key) => {
            let (c, h) = ReceiptChecker::new(key, source.clone());
            (Some(c.with_witness(outbox.signer().cosigner())), h)
        }
        None => (None, ReceiptHealth::unchecked()),
    };
    let (acked_tx, acked_rx) = watch::channel(0);
    let depth = Arc::new(AtomicU64::new(0));
    {
        let depth = depth.clone();
        crate::metrics::observe_outbox_depth(source.clone(), move || {
            depth.load(Ordering::Relaxed) as usize
        });
    }
    let stalled: Stalled = Arc::default();
    observe_stalled(source, stalled.clone());
    let (keep, alarm_after) = (options.keep, options.stall_alarm);
    let reconnect = options.reconnect;
    let mut channel = channel;
    let handle_stalled = stalled.clone();
    let task = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(50);
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing: Option<(Instant, Option<Instant>)> = None;
        let mut loaded = false;
        loop {
            let outcome = if loaded {
                update_depth(&outbox, &acked_tx, &depth).await;
                let checker = checker.as_mut();
                let mut progressed = false;
                let mut tick = Housekeeping {
                    prune: &mut prune,
                    keep,
                    progressed: &mut progressed,
                };
                let outcome = session(
                    &outbox,
                    channel.clone(),
                    &acked_tx,
                    &mut backoff,
                    &depth,
                    checker,
                    &mut tick,
                )
                .await;
                if progressed {
                    failing = None;
                    *stalled.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                outcome
            } else {
                match load(&outbox, checker.as_mut()).await {
                    Ok(start) => {
                        acked_tx.send_if_modified(|a| {
                            let changed = start > *a;
                            *a = (*a).max(start);
                            changed
                        });
                        loaded = true;
                        continue;
                    }
                    Err(e) => Err(format!("cannot read the outbox: {e}")),
                }
            };
            if let Err(why) = outcome {
                if let Some(peer) = &reconnect {
                    channel = peer.channel();
                }
                tracing::warn!(
                    source = %outbox.signer().source(),
                    depth = depth.load(Ordering::Relaxed),
                    "audit shipping paused: {why}"
                );
                let now = Instant::now();
                let (since, alarmed) = failing.get_or_insert((now, None));
                if now.duration_since(*since) >= alarm_after {
                    *stalled.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
                }
                if now.duration_since(*since) >= alarm_after
                    && alarmed.is_none_or(|a| now.duration_since(a) >= alarm_after)
                {
                    *alarmed = Some(now);
                    tracing::error!(
                        source = %outbox.signer().source(),
                        depth = depth.load(Ordering::Relaxed),
                        failing_for_s = now.duration_since(*since).as_secs(),
                        "audit shipping keeps failing and this source cannot recover on its \
                         own: {why}; see docs/RELIABILITY.md"
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
            stalled: handle_stalled,
        },
        task,
    )
}

/// Reads what shipping starts from: the accepted checkpoint (into the
/// receipt checker) and the sequence number below the oldest waiting event.
async fn load<O: OutboxStore>(
    outbox: &O,
    checker: Option<&mut ReceiptChecker>,
) -> Result<u64, crate::outbox::OutboxError> {
    if let Some(c) = checker {
        c.resume(outbox.accepted_checkpoint().await?);
    }
    let start = match outbox.first_pending().await? {
        Some(seq) => seq,
        None => outbox.next_seq().await?,
    };
    Ok(start.saturating_sub(1))
}

/// Gauge `twokey.audit.shipping.stalled` per source.
fn observe_stalled(source: String, stalled: Stalled) {
    let attrs = [opentelemetry::KeyValue::new("source", source)];
    crate::metrics::meter()
        .u64_observable_gauge("twokey.audit.shipping.stalled")
        .with_description("1 while shipping events to audit has kept failing for over a minute")
        .with_unit("1")
        .with_callback(move |gauge| {
            let on = stalled.lock().unwrap_or_else(|e| e.into_inner()).is_some();
            gauge.observe(u64::from(on), &attrs);
        })
        .build();
}

/// What a session does besides shipping: dropping kept events past the
/// retention, and telling the loop that it made progress.
struct Housekeeping<'a> {
    prune: &'a mut tokio::time::Interval,
    keep: Duration,
    progressed: &'a mut bool,
}

impl Housekeeping<'_> {
    async fn prune<O: OutboxStore>(&self, outbox: &O) {
        let Some(cutoff) = std::time::SystemTime::now().checked_sub(self.keep) else {
            return;
        };
        match outbox.prune_kept(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(
                source = %outbox.signer().source(),
                dropped = n,
                "kept events past the retention dropped"
            ),
            Err(e) => {
                tracing::warn!(source = %outbox.signer().source(), "cannot drop kept events: {e}")
            }
        }
    }
}

/// Sends audit the events this source kept from leaf index `from` on, in
/// leaf order, for a log restored from an older backup.
async fn restore<O: OutboxStore>(
    outbox: &O,
    channel: Channel,
    from: u64,
) -> Result<RestoreResponse, String> {
    let mut client = AuditServiceClient::new(channel)
        .max_decoding_message_size(crate::serve::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::serve::MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel::<RestoreRequest>(RESTORE_BATCH);
    let feed = async move {
        let mut next = from;
        let mut sent = 0u64;
        loop {
            let batch = match outbox.kept_from(next, RESTORE_BATCH).await {
                Ok(batch) => batch,
                Err(e) => return Err(format!("restore: cannot read the kept events: {e}")),
            };
            if batch.is_empty() {
                return Ok(sent);
            }
            for (index, event) in batch {
                next = index + 1;
                let item = RestoreRequest {
                    leaf_index: index,
                    event: Some(event),
                };
                if tx.send(item).await.is_err() {
                    return Ok(sent);
                }
                sent += 1;
            }
        }
    };
    let call = client.restore(ReceiverStream::new(rx));
    let (sent, answer) = tokio::join!(feed, call);
    let sent = sent?;
    let answer = answer
        .map_err(|s| format!("restore: {}: {}", s.code(), s.message()))?
        .into_inner();
    tracing::warn!(
        source = %outbox.signer().source(),
        from,
        sent,
        accepted = answer.accepted,
        holds = answer.tree_size,
        signed = answer.target_size,
        next_missing = answer.next_missing,
        "audit holds fewer entries than a checkpoint it signed: sent it the events this source kept"
    );
    Ok(answer)
}

/// Events written and not yet acknowledged: the sequence numbers above the
/// acknowledged one.
/// Kept as it was when the outbox cannot be read.
async fn update_depth<O: OutboxStore>(outbox: &O, acked: &watch::Sender<u64>, depth: &AtomicU64) {
    let Ok(next) = outbox.next_seq().await else {
        return;
    };
    let written = next.saturating_sub(1);
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
fn acknowledged<O: OutboxStore>(outbox: &O, sent: &mut VecDeque<Sent>, seq: u64) {
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

async fn session<O: OutboxStore>(
    outbox: &O,
    channel: Channel,
    acked: &watch::Sender<u64>,
    backoff: &mut Duration,
    depth: &AtomicU64,
    mut checker: Option<&mut ReceiptChecker>,
    tick: &mut Housekeeping<'_>,
) -> Result<(), String> {
    let known = checker.as_ref().map_or(0, |c| c.known_size());
    let known_checkpoint = checker
        .as_ref()
        .and_then(|c| c.accepted())
        .map(|(_, note)| note.clone())
        .unwrap_or_default();
    let restore_channel = channel.clone();
    let mut sent = VecDeque::new();
    let (tx, rx) = mpsc::channel::<AppendRequest>(WINDOW);
    let mut client = AuditServiceClient::new(channel)
        .max_decoding_message_size(crate::serve::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::serve::MAX_MESSAGE_BYTES);
    let mut next = match outbox.first_pending().await.map_err(|e| e.to_string())? {
        Some(seq) => seq,
        None => outbox.next_seq().await.map_err(|e| e.to_string())?,
    };
    let mut in_flight = 0usize;
    if checker.is_some() {
        // Hello: the size of the checkpoint accepted last, and a receipt now
        // (the source, as a witness, sees the latest checkpoint at once).
        tx.send(AppendRequest {
            known_size: known,
            known_checkpoint,
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
                // Every answer already here is handled before the outbox is
                // written: one settle (one sled batch) and one wake-up of
                // the waiting callers per group of answers, not per event.
                let mut message = Some(message);
                let mut settle: Option<u64> = None;
                let mut outcome = Ok(());
                while let Some(m) = match message.take() {
                    Some(m) => Some(m),
                    None => tokio::select! {
                        biased;
                        m = responses.message() => Some(m),
                        () = std::future::ready(()) => None,
                    },
                } {
                    let step = match m
                        .map_err(|s| format!("{}: {}", s.code(), s.message()))
                        .and_then(|r| r.ok_or_else(|| "audit closed the stream".to_owned()))
                    {
                        Ok(response) => {
                            let mut at = Answering {
                                outbox,
                                tx: &tx,
                                checker: checker.as_deref_mut(),
                                in_flight: &mut in_flight,
                                progressed: &mut *tick.progressed,
                                restore_channel: &restore_channel,
                            };
                            at.answer(response).await
                        }
                        Err(e) => Err(e),
                    };
                    match step {
                        Ok(Some(seq)) => settle = Some(settle.map_or(seq, |s| s.max(seq))),
                        Ok(None) => {}
                        Err(e) => {
                            outcome = Err(e);
                            break;
                        }
                    }
                }
                if let Some(seq) = settle {
                    // Those acknowledged before a refusal in the same group
                    // are settled and answered too, as they were one by one.
                    outbox.settle_through(seq).await.map_err(|e| e.to_string())?;
                    acked.send_if_modified(|a| {
                        let changed = seq > *a;
                        *a = (*a).max(seq);
                        changed
                    });
                    acknowledged(outbox, &mut sent, seq);
                    update_depth(outbox, acked, depth).await;
                    *backoff = Duration::from_millis(50);
                }
                outcome?;
            }
            () = outbox.notified() => update_depth(outbox, acked, depth).await,
            _ = tick.prune.tick() => tick.prune(outbox).await,
        }
    }
}

/// What one answer of the append stream needs besides the answer.
struct Answering<'a, O> {
    outbox: &'a O,
    tx: &'a mpsc::Sender<AppendRequest>,
    checker: Option<&'a mut ReceiptChecker>,
    in_flight: &'a mut usize,
    progressed: &'a mut bool,
    restore_channel: &'a Channel,
}

impl<O: OutboxStore> Answering<'_, O> {
    /// Handles one answer: `Ok(Some(seq))` when every event through `seq`
    /// is acknowledged (and covered by an accepted receipt, when receipts
    /// are checked) and may be settled; `Ok(None)` when nothing is to be
    /// settled yet; `Err` ends the session.
    async fn answer(
        &mut self,
        response: twokey_proto::audit::v1::AppendResponse,
    ) -> Result<Option<u64>, String> {
        let outbox = self.outbox;
        let status = AppendStatus::try_from(response.status);
        if status == Ok(AppendStatus::Unspecified) && !response.checkpoint.is_empty() {
            // A receipt alone: no event answered.
            if let Some(c) = self.checker.as_deref_mut() {
                if let Verdict::Inconsistent(i) = c
                    .check(
                        outbox,
                        &response.checkpoint,
                        None,
                        &response.consistency_proof,
                    )
                    .await?
                {
                    return Err(i.to_string());
                }
                send_cosignature(c, self.tx);
            }
            return Ok(None);
        }
        if status == Ok(AppendStatus::Restore) {
            if let Some(c) = self.checker.as_deref_mut() {
                c.restoring(response.leaf_index);
            }
            let answer = restore(outbox, self.restore_channel.clone(), response.leaf_index).await?;
            return Err(format!(
                "audit is restoring its log from the sources: it holds {} of {} entries \
                 (next missing {}); reconnecting",
                answer.tree_size, answer.target_size, answer.next_missing
            ));
        }
        *self.in_flight = self.in_flight.saturating_sub(1);
        match status {
            Ok(AppendStatus::Stored | AppendStatus::Duplicate) => {
                outbox
                    .record_leaf(response.seq, response.leaf_index)
                    .await
                    .map_err(|e| e.to_string())?;
                *self.progressed = true;
                if let Some(c) = self.checker.as_deref_mut() {
                    if response.checkpoint.is_empty() {
                        // Covered by the next receipt on this stream.
                        return Ok(None);
                    }
                    let verdict = c
                        .check(
                            outbox,
                            &response.checkpoint,
                            Some(response.leaf_index),
                            &response.consistency_proof,
                        )
                        .await?;
                    if let Verdict::Inconsistent(i) = verdict {
                        return Err(i.to_string());
                    }
                    send_cosignature(c, self.tx);
                }
                Ok(Some(response.seq))
            }
            Ok(AppendStatus::Gap) => {
                if let Some(c) = self.checker.as_deref_mut()
                    && !response.checkpoint.is_empty()
                    && let Verdict::Inconsistent(i) = c
                        .check(
                            outbox,
                            &response.checkpoint,
                            None,
                            &response.consistency_proof,
                        )
                        .await?
                {
                    return Err(i.to_string());
                }
                // Everything below expected_seq is stored; start over from
                // there, with kept events put back if audit lost some it
                // had acknowledged.
                let stored = response.expected_seq.saturating_sub(1);
                outbox
                    .settle_through(stored)
                    .await
                    .map_err(|e| e.to_string())?;
                match outbox.requeue_from(response.expected_seq).await {
                    Ok(()) => {}
                    Err(RequeueError::Unrecoverable(u)) => return Err(u.to_string()),
                    Err(e) => return Err(e.to_string()),
                }
                Err(format!(
                    "audit expects event {} next; resending",
                    response.expected_seq
                ))
            }
            _ => Err(format!("unexpected append status {}", response.status)),
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

async fn queue<O: OutboxStore>(
    outbox: &O,
    tx: &mpsc::Sender<AppendRequest>,
    next: &mut u64,
    in_flight: &mut usize,
    sent: &mut VecDeque<Sent>,
    known_size: u64,
) -> Result<(), String> {
    if *in_flight >= WINDOW {
        return Ok(());
    }
    let pending = outbox
        .pending(*next, WINDOW - *in_flight)
        .await
        .map_err(|e| e.to_string())?;
    for (seq, event) in pending {
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
