//! The durable delivery queue: one entry per message and notifier,
//! retried with exponential backoff; a notification that finally fails is
//! recorded (`notification.failed`). A queued PIN is sealed ([`PinSeal`]).
//!
//! What both storages share lives here ([`Deliveries`]: the entries, the
//! order of a pass — PINs first, a bounded batch, a pass cut short when a
//! PIN is queued —, the retries and their backoff, the failed event, the
//! worker loop); [`NotifyQueue`] keeps the entries in sled (one broker),
//! `super::pg::PgQueue` in PostgreSQL (shared by replicas).

use std::{
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering::SeqCst},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use sled::{
    Transactional,
    transaction::{ConflictableTransactionError, TransactionalTree},
};
use tokio::sync::Notify;
use twokey_proto::audit::v1::Outcome;
use twokey_runtime::{durable::DurableDb, events::EventDraft, outbox::Outbox, time::Clock};

use super::{Message, Notifier, NotifyError, Recipient, seal::PinSeal};
use crate::{
    error::BrokerError,
    pin::{Pin, PinKey},
    state::millis,
};

/// Attempts before a notification is given up.
pub const MAX_ATTEMPTS: u32 = 6;
/// Most notifications one pass delivers before it looks for PINs again.
pub(crate) const DELIVERY_BATCH: usize = 64;
/// First retry delay; doubled on each failure.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Longest wait of the worker between passes: retries that came due, and
/// (in PostgreSQL) entries whose wake-up was lost with a session.
pub(crate) const POLL: Duration = Duration::from_secs(1);

/// A queued delivery: one message for one notifier.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub(crate) id: String,
    notifier: String,
    message_id: String,
    kind: String,
    request_id: String,
    account_id: String,
    to: Recipient,
    text: String,
    /// base64(nonce ‖ ciphertext) of the PIN; AAD is the entry id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) sealed_pin: Option<String>,
    at_ms: u64,
    attempts: u32,
    pub(crate) next_ms: u64,
    #[serde(default)]
    last_error: String,
}

/// What one pass decided for the entries it tried.
#[derive(Debug, Default)]
pub(crate) struct Settlement {
    /// Each entry tried: kept for its retry (with its new attempts and
    /// due time), or gone (delivered, or given up).
    pub(crate) entries: Vec<(String, Option<Entry>)>,
    /// `notification.failed` of the entries given up.
    pub(crate) failed: Vec<EventDraft>,
    /// How many were delivered.
    pub(crate) delivered: u64,
}

/// The worker's signals of one queue: woken when entries are queued, and
/// whether a PIN was queued since the pass began.
#[derive(Debug, Default)]
pub(crate) struct Signals {
    pub(crate) wake: Notify,
    pub(crate) pin_queued: AtomicBool,
}

/// What the sled and the PostgreSQL queue share: the notifiers, the PIN
/// seal, the clock, the delivery counter, and the delivery logic.
pub(crate) struct Deliveries {
    notifiers: Vec<Arc<dyn Notifier>>,
    seal: PinSeal,
    pub(crate) clock: Arc<dyn Clock>,
    delivered: RwLock<tokio::sync::watch::Sender<u64>>,
}

impl Deliveries {
    pub(crate) fn new(
        notifiers: Vec<Arc<dyn Notifier>>,
        key: &PinKey,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            notifiers,
            seal: PinSeal::new(key),
            clock,
            delivered: RwLock::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// Counts deliveries with `counter` from now on.
    pub(crate) fn set_delivery_counter(&self, counter: tokio::sync::watch::Sender<u64>) {
        *self
            .delivered
            .write()
            .unwrap_or_else(PoisonError::into_inner) = counter;
    }

    pub(crate) fn deliveries(&self) -> tokio::sync::watch::Receiver<u64> {
        self.delivered
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .subscribe()
    }

    pub(crate) fn deliverable(&self, message: &Message) -> bool {
        self.notifiers.iter().any(|n| n.accepts(message))
    }

    pub(crate) fn now_ms(&self) -> u64 {
        millis(self.clock.now())
    }

    /// The entries of `messages`: one per notifier that takes each, in
    /// order, each with the id `id` gives it and its PIN sealed to that
    /// id. Sets `signals.pin_queued` when one holds a PIN.
    pub(crate) fn entries(
        &self,
        signals: &Signals,
        messages: &[Message],
        mut id: impl FnMut() -> String,
    ) -> Vec<Entry> {
        let mut out = Vec::new();
        for message in messages {
            if message.pin.is_some() {
                // (Set again if the transaction runs again: harmless.)
                signals.pin_queued.store(true, SeqCst);
            }
            for notifier in self.notifiers.iter().filter(|n| n.accepts(message)) {
                let id = id();
                out.push(Entry {
                    sealed_pin: message.pin.as_ref().map(|p| self.seal.seal(&id, p)),
                    id,
                    notifier: notifier.name().to_owned(),
                    message_id: message.id.clone(),
                    kind: message.kind.clone(),
                    request_id: message.request_id.clone(),
                    account_id: message.account_id.clone(),
                    to: message.to.clone(),
                    text: message.text.clone(),
                    at_ms: message.at_ms,
                    attempts: 0,
                    next_ms: 0,
                    last_error: String::new(),
                });
            }
        }
        out
    }

    fn open_pin(&self, entry: &Entry) -> Result<Option<Pin>, NotifyError> {
        entry
            .sealed_pin
            .as_deref()
            .map(|sealed| self.seal.open(&entry.id, sealed))
            .transpose()
    }

    /// Delivers `due` (PINs first, as the storage picked them) in order;
    /// stops after the delivery in hand when a PIN was queued meanwhile
    /// (then says so: `true`).
    pub(crate) async fn deliver_all(
        &self,
        signals: &Signals,
        due: Vec<Entry>,
    ) -> (Vec<(Entry, Result<(), NotifyError>)>, bool) {
        let mut done = Vec::with_capacity(due.len());
        for entry in due {
            let result = self.deliver(&entry).await;
            done.push((entry, result));
            if signals.pin_queued.load(SeqCst) {
                return (done, true);
            }
        }
        (done, false)
    }

    async fn deliver(&self, entry: &Entry) -> Result<(), NotifyError> {
        let notifier = self
            .notifiers
            .iter()
            .find(|n| n.name() == entry.notifier)
            .ok_or_else(|| {
                NotifyError(format!(
                    "notifier {} is no longer configured",
                    entry.notifier
                ))
            })?;
        let message = Message {
            id: entry.message_id.clone(),
            kind: entry.kind.clone(),
            request_id: entry.request_id.clone(),
            account_id: entry.account_id.clone(),
            to: entry.to.clone(),
            text: entry.text.clone(),
            pin: self.open_pin(entry)?,
            at_ms: entry.at_ms,
        };
        notifier.send(&message).await
    }

    /// What becomes of each delivery tried: a delivered entry leaves the
    /// queue, a failed one is kept for its retry after [`backoff`] or, at
    /// the last attempt, replaced by its `notification.failed` event.
    pub(crate) fn settlement(&self, done: Vec<(Entry, Result<(), NotifyError>)>) -> Settlement {
        let now_ms = self.now_ms();
        let mut out = Settlement::default();
        for (mut entry, result) in done {
            match &result {
                Ok(()) => {
                    out.delivered += 1;
                    tracing::debug!(notifier = %entry.notifier, kind = %entry.kind, request_id = %entry.request_id, "notification delivered");
                    out.entries.push((entry.id, None));
                }
                Err(e) => {
                    entry.attempts += 1;
                    entry.last_error = e.0.clone();
                    if entry.attempts >= MAX_ATTEMPTS {
                        tracing::warn!(notifier = %entry.notifier, kind = %entry.kind, request_id = %entry.request_id, attempts = entry.attempts, "notification failed for good: {e}");
                        let to = match &entry.to {
                            Recipient::Person { identity, .. } => identity.clone(),
                            Recipient::Channel => "channel".into(),
                        };
                        out.failed.push(
                            EventDraft::new("broker", "notification.failed")
                                .account(&entry.account_id)
                                .request(&entry.request_id)
                                .outcome(Outcome::Failure)
                                .attr("notifier", &entry.notifier)
                                .attr("kind", &entry.kind)
                                .attr("to", to)
                                .attr("attempts", entry.attempts.to_string())
                                .attr("error", &entry.last_error),
                        );
                        out.entries.push((entry.id, None));
                    } else {
                        entry.next_ms = now_ms.saturating_add(
                            u64::try_from(backoff(entry.attempts).as_millis()).unwrap_or(u64::MAX),
                        );
                        tracing::info!(notifier = %entry.notifier, kind = %entry.kind, request_id = %entry.request_id, attempts = entry.attempts, "notification failed, will retry: {e}");
                        out.entries.push((entry.id.clone(), Some(entry)));
                    }
                }
            }
        }
        out
    }

    /// Counts deliveries once their settlement is stored.
    pub(crate) fn count(&self, delivered: u64) {
        if delivered > 0 {
            self.delivered
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .send_modify(|n| *n += delivered);
        }
    }
}

/// The worker loop of either queue: a pass (which clears
/// `signals.pin_queued` before it looks for due entries) whenever woken,
/// and at least every [`POLL`]; at once again after a full batch or a pass
/// cut short for a PIN.
pub(crate) async fn work<F, Fut>(signals: &Signals, pass: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (usize, bool)>,
{
    loop {
        let (tried, interrupted) = pass().await;
        if tried >= DELIVERY_BATCH || interrupted {
            // More may be due (or a PIN was queued): go on at once.
            continue;
        }
        tokio::select! {
            () = signals.wake.notified() => {}
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// The durable delivery queue in sled, and its notifiers.
pub struct NotifyQueue {
    db: DurableDb,
    tree: sled::Tree,
    outbox: Outbox,
    deliveries: Arc<Deliveries>,
    signals: Signals,
    next_seq: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for NotifyQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifyQueue")
            .field("notifiers", &self.deliveries.notifiers)
            .finish_non_exhaustive()
    }
}

/// Whether a stored entry may carry a PIN: its JSON has the `sealed_pin`
/// key (written only when there is one). A quote inside a text value is
/// escaped, so a text cannot make this true; it would only cost a decode.
fn may_hold_pin(entry: &[u8]) -> bool {
    const KEY: &[u8] = b"\"sealed_pin\"";
    entry.windows(KEY.len()).any(|w| w == KEY)
}

/// The delay before retry `attempts` (1: the first retry).
pub(crate) fn backoff(attempts: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

impl NotifyQueue {
    /// Opens the queue in `db` with these notifiers.
    pub fn open(
        db: &DurableDb,
        outbox: Outbox,
        notifiers: Vec<Arc<dyn Notifier>>,
        key: &PinKey,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, BrokerError> {
        let tree = db.tree("notify_queue")?;
        // Keys start with a hex sequence number; carry on after the last one.
        let next_seq = tree
            .last()?
            .and_then(|(k, _)| {
                u64::from_str_radix(std::str::from_utf8(k.get(..16)?).ok()?, 16).ok()
            })
            .map_or(0, |n| n + 1);
        Ok(Self {
            db: db.clone(),
            tree,
            outbox,
            deliveries: Arc::new(Deliveries::new(notifiers, key, clock)),
            signals: Signals::default(),
            next_seq: std::sync::atomic::AtomicU64::new(next_seq),
        })
    }

    /// Uses `counter` to count successful deliveries (tests wait on it).
    pub fn with_delivery_counter(self, counter: tokio::sync::watch::Sender<u64>) -> Self {
        self.deliveries.set_delivery_counter(counter);
        self
    }

    /// The number of messages delivered so far, as a watch.
    pub fn deliveries(&self) -> tokio::sync::watch::Receiver<u64> {
        self.deliveries.deliveries()
    }

    /// The notifiers, seal, clock and delivery counter, shared with the
    /// PostgreSQL queue.
    pub(crate) fn shared(&self) -> Arc<Deliveries> {
        self.deliveries.clone()
    }

    /// The queue's tree, to include in a transaction.
    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// Whether any notifier takes `message`.
    pub fn deliverable(&self, message: &Message) -> bool {
        self.deliveries.deliverable(message)
    }

    /// Queued deliveries.
    pub fn depth(&self) -> usize {
        self.tree.len()
    }

    /// Queues `messages` inside a transaction over [`NotifyQueue::tree`]:
    /// one entry per notifier that takes each message.
    pub fn enqueue(
        &self,
        tx: &TransactionalTree,
        messages: &[Message],
    ) -> Result<(), ConflictableTransactionError<BrokerError>> {
        // Ordered keys: deliveries go out in the order they were queued.
        let entries = self.deliveries.entries(&self.signals, messages, || {
            let seq = self
                .next_seq
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("{seq:016x}-{}", uuid::Uuid::new_v4())
        });
        for entry in entries {
            let bytes = serde_json::to_vec(&entry).map_err(|e| {
                ConflictableTransactionError::Abort(BrokerError::Store(e.to_string()))
            })?;
            tx.insert(entry.id.as_bytes(), bytes)?;
        }
        Ok(())
    }

    /// Tells the worker that new entries are durable.
    pub fn wake(&self) {
        self.signals.wake.notify_one();
    }

    /// Tries every entry that is due now once; returns how many were tried.
    pub async fn run_due(&self) -> usize {
        self.run_pass().await.0
    }

    /// One pass: tries the entries due now, PINs first, and settles them
    /// all in one transaction at the end (one log write, not one per
    /// message). Stops early, after the delivery in hand, when a PIN was
    /// queued meanwhile; says so (`true`), so that the next pass starts at
    /// once with that PIN.
    async fn run_pass(&self) -> (usize, bool) {
        // Cleared before the scan: a PIN queued after it sets it again.
        self.signals.pin_queued.store(false, SeqCst);
        let now_ms = self.deliveries.now_ms();
        // PINs first: a requester is waiting on the call for theirs, while
        // the rest only tell people about a change. A bounded batch, so a
        // PIN queued behind a burst of such messages waits for at most one
        // batch, not the burst, and a long queue is never all in memory.
        let mut due = Vec::new();
        let mut others = Vec::new();
        for (_, bytes) in self.tree.iter().filter_map(Result::ok) {
            // Once a batch of other messages is found, only PINs are
            // looked for: an entry without the field is not decoded (a
            // long queue is scanned on every pass).
            if others.len() >= DELIVERY_BATCH && !may_hold_pin(&bytes) {
                continue;
            }
            let Ok(entry) = serde_json::from_slice::<Entry>(&bytes) else {
                continue;
            };
            if entry.next_ms > now_ms {
                continue;
            }
            if entry.sealed_pin.is_some() {
                if due.len() < DELIVERY_BATCH {
                    due.push(entry);
                }
            } else if others.len() < DELIVERY_BATCH {
                others.push(entry);
            }
        }
        due.extend(others);
        due.truncate(DELIVERY_BATCH);
        let (done, interrupted) = self.deliveries.deliver_all(&self.signals, due).await;
        let tried = done.len();
        if let Err(e) = self.settle(self.deliveries.settlement(done)).await {
            tracing::error!("notification queue: {e}");
        }
        (tried, interrupted)
    }

    /// Stores a pass's settlement in one transaction (then synced, when it
    /// holds a `notification.failed` event, so the event ships).
    async fn settle(&self, settlement: Settlement) -> Result<(), BrokerError> {
        if settlement.entries.is_empty() {
            return Ok(());
        }
        let mut writes = Vec::with_capacity(settlement.entries.len());
        for (id, keep) in settlement.entries {
            let bytes = keep
                .map(|entry| serde_json::to_vec(&entry))
                .transpose()
                .map_err(|e| BrokerError::Store(e.to_string()))?;
            writes.push((id, bytes));
        }
        let failed_events = settlement.failed;
        (&self.tree, self.outbox.tree())
            .transaction(|(q, o)| {
                for (id, keep) in &writes {
                    match keep {
                        Some(bytes) => q.insert(id.as_bytes(), bytes.clone())?,
                        None => q.remove(id.as_bytes())?,
                    };
                }
                for event in &failed_events {
                    self.outbox.push::<BrokerError>(o, event.clone())?;
                }
                Ok(())
            })
            .map_err(|e: sled::transaction::TransactionError<BrokerError>| {
                BrokerError::Store(e.to_string())
            })?;
        if !failed_events.is_empty() {
            self.db.sync().await?;
            self.outbox.committed();
        }
        self.deliveries.count(settlement.delivered);
        Ok(())
    }

    /// Delivers forever: whenever woken, and at least every second to pick
    /// up retries that came due.
    pub async fn run(self: Arc<Self>) {
        work(&self.signals, || self.run_pass()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::BoxFuture;
    use std::sync::Mutex;
    use twokey_runtime::SpiffeId;
    use twokey_runtime::{events::EventSigner, keys::SecretKey, time::ManualClock};

    #[derive(Debug, Default)]
    struct Flaky {
        fail: bool,
        seen: Mutex<Vec<(String, Option<String>)>>,
        /// Runs once, in the first send (a change made while it delivers).
        hook: Mutex<Option<Hook>>,
    }

    struct Hook(Box<dyn FnOnce() + Send>);

    impl std::fmt::Debug for Hook {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Hook")
        }
    }

    impl Notifier for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn accepts(&self, _: &Message) -> bool {
            true
        }
        fn send<'a>(&'a self, m: &'a Message) -> BoxFuture<'a, Result<(), NotifyError>> {
            Box::pin(async move {
                let hook = self.hook.lock().unwrap().take();
                if let Some(Hook(hook)) = hook {
                    hook();
                }
                self.seen.lock().unwrap().push((
                    m.kind.clone(),
                    m.pin.as_ref().map(|p| p.expose().to_owned()),
                ));
                if self.fail {
                    Err(NotifyError("503 from the far end".into()))
                } else {
                    Ok(())
                }
            })
        }
    }

    fn setup(
        fail: bool,
    ) -> (
        tempfile::TempDir,
        Arc<NotifyQueue>,
        Arc<Flaky>,
        ManualClock,
        Outbox,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let db = DurableDb::open(dir.path()).unwrap();
        let clock = ManualClock::new(std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let signer = EventSigner::new(
            SpiffeId::parse("spiffe://t/svc/broker").unwrap(),
            ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng),
        );
        let outbox = Outbox::open(&db, signer, Arc::new(clock.clone())).unwrap();
        let flaky = Arc::new(Flaky {
            fail,
            ..Flaky::default()
        });
        let queue = NotifyQueue::open(
            &db,
            outbox.clone(),
            vec![flaky.clone() as Arc<dyn Notifier>],
            &PinKey::new(SecretKey::from_bytes([3; 32])),
            Arc::new(clock.clone()),
        )
        .unwrap();
        (dir, Arc::new(queue), flaky, clock, outbox)
    }

    fn pin_message() -> Message {
        Message {
            id: "m1".into(),
            kind: "pin".into(),
            request_id: "r1".into(),
            account_id: "a".into(),
            to: Recipient::Channel,
            text: "A PIN was issued".into(),
            pin: Some(Pin::from_text("4815162342")),
            at_ms: 0,
        }
    }

    fn enqueue(queue: &NotifyQueue, m: Message) {
        queue
            .tree()
            .transaction(|tx| queue.enqueue(tx, std::slice::from_ref(&m)))
            .unwrap();
    }

    #[tokio::test]
    async fn queued_pins_are_sealed_and_delivered_in_the_clear() {
        let (_dir, queue, flaky, _clock, _) = setup(false);
        enqueue(&queue, pin_message());
        let raw: Vec<u8> = queue
            .tree()
            .iter()
            .flat_map(|kv| kv.unwrap().1.to_vec())
            .collect();
        assert!(!String::from_utf8_lossy(&raw).contains("4815162342"));
        assert_eq!(queue.run_due().await, 1);
        assert_eq!(queue.depth(), 0);
        assert_eq!(
            flaky.seen.lock().unwrap().as_slice(),
            &[("pin".to_owned(), Some("4815162342".to_owned()))]
        );
    }

    #[tokio::test]
    async fn a_failing_notification_backs_off_then_is_recorded_as_failed() {
        let (_dir, queue, flaky, clock, outbox) = setup(true);
        enqueue(&queue, pin_message());
        let before = outbox.next_seq();
        assert_eq!(queue.run_due().await, 1);
        // Not due again until the backoff has passed.
        assert_eq!(queue.run_due().await, 0);
        for attempt in 1..MAX_ATTEMPTS {
            clock.advance(backoff(attempt));
            assert_eq!(queue.run_due().await, 1, "attempt {}", attempt + 1);
        }
        assert_eq!(queue.depth(), 0, "given up after {MAX_ATTEMPTS} attempts");
        assert_eq!(flaky.seen.lock().unwrap().len() as u32, MAX_ATTEMPTS);
        let events = outbox.pending(before, 10);
        assert_eq!(events.len(), 1);
        let event =
            twokey_runtime::events::verify_event(&events[0].1, &outbox.signer().verifying_key())
                .unwrap();
        assert_eq!(event.action, "notification.failed");
        assert_eq!(event.attributes["attempts"], MAX_ATTEMPTS.to_string());
        assert!(!format!("{event:?}").contains("4815162342"));
    }

    #[tokio::test]
    async fn a_pin_goes_out_before_a_burst_of_other_messages_queued_ahead_of_it() {
        // Found by the end-to-end load test: with 200 approvers and 200
        // operators notified of every change, PINs waited behind tens of
        // thousands of such messages and most flows timed out.
        let (_dir, queue, flaky, _clock, _) = setup(false);
        for i in 0..DELIVERY_BATCH + 10 {
            let mut m = pin_message();
            m.id = format!("fyi-{i}");
            m.kind = "request.created".into();
            m.pin = None;
            enqueue(&queue, m);
        }
        enqueue(&queue, pin_message());
        assert_eq!(queue.run_due().await, DELIVERY_BATCH);
        assert_eq!(flaky.seen.lock().unwrap()[0].0, "pin");
        assert_eq!(queue.run_due().await, 11);
        assert_eq!(queue.depth(), 0);
    }

    #[tokio::test]
    async fn a_pin_queued_during_a_pass_goes_out_right_after_the_delivery_in_hand() {
        // The sequential flow: an approval queues the PIN while the worker
        // is still delivering the notices of the request's creation.
        let (_dir, queue, flaky, _clock, _) = setup(false);
        for kind in ["first", "second", "third"] {
            let mut m = pin_message();
            m.kind = kind.into();
            m.pin = None;
            enqueue(&queue, m);
        }
        let q = queue.clone();
        *flaky.hook.lock().unwrap() = Some(Hook(Box::new(move || enqueue(&q, pin_message()))));
        assert_eq!(queue.run_pass().await, (1, true));
        // The delivered one is settled; the rest wait behind the PIN.
        assert_eq!(queue.depth(), 3);
        assert_eq!(queue.run_due().await, 3);
        let seen: Vec<String> = flaky
            .seen
            .lock()
            .unwrap()
            .iter()
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(seen, ["first", "pin", "second", "third"]);
        assert_eq!(queue.depth(), 0);
    }

    #[tokio::test]
    async fn deliveries_go_out_in_the_order_they_were_queued() {
        let (_dir, queue, flaky, _clock, _) = setup(false);
        for kind in ["first", "second", "third"] {
            let mut m = pin_message();
            m.kind = kind.into();
            m.pin = None;
            enqueue(&queue, m);
        }
        assert_eq!(queue.run_due().await, 3);
        let seen: Vec<String> = flaky
            .seen
            .lock()
            .unwrap()
            .iter()
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(seen, ["first", "second", "third"]);
    }

    #[test]
    fn only_an_entry_with_a_sealed_pin_is_taken_for_one_without_decoding() {
        let (_dir, queue, _flaky, _clock, _) = setup(false);
        let mut m = pin_message();
        m.text = r#"a text quoting "sealed_pin": "x" is no PIN"#.into();
        m.pin = None;
        enqueue(&queue, m.clone());
        m.pin = Some(Pin::from_text("4815162342"));
        enqueue(&queue, m);
        let stored: Vec<_> = queue.tree().iter().map(|kv| kv.unwrap().1).collect();
        assert!(!may_hold_pin(&stored[0]));
        assert!(may_hold_pin(&stored[1]));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
