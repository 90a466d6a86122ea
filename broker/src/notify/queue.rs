//! The durable delivery queue in sled: one entry per message and notifier,
//! retried with exponential backoff; a notification that finally fails is
//! recorded (`notification.failed`). A queued PIN is sealed ([`PinSeal`]).

use std::{sync::Arc, time::Duration};

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
const DELIVERY_BATCH: usize = 64;
/// First retry delay; doubled on each failure.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// A queued delivery: one message for one notifier.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    id: String,
    notifier: String,
    message_id: String,
    kind: String,
    request_id: String,
    account_id: String,
    to: Recipient,
    text: String,
    /// base64(nonce ‖ ciphertext) of the PIN; AAD is the entry id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed_pin: Option<String>,
    at_ms: u64,
    attempts: u32,
    next_ms: u64,
    #[serde(default)]
    last_error: String,
}

/// The durable delivery queue and its notifiers.
pub struct NotifyQueue {
    db: DurableDb,
    tree: sled::Tree,
    outbox: Outbox,
    notifiers: Vec<Arc<dyn Notifier>>,
    seal: PinSeal,
    clock: Arc<dyn Clock>,
    wake: Notify,
    delivered: tokio::sync::watch::Sender<u64>,
    next_seq: std::sync::atomic::AtomicU64,
    /// Set when a PIN is queued: a pass delivering other messages stops
    /// after the one in hand, so the PIN goes out next.
    pin_queued: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for NotifyQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifyQueue")
            .field("notifiers", &self.notifiers)
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

fn backoff(attempts: u32) -> Duration {
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
            notifiers,
            seal: PinSeal::new(key),
            clock,
            wake: Notify::new(),
            delivered: tokio::sync::watch::Sender::new(0),
            next_seq: std::sync::atomic::AtomicU64::new(next_seq),
            pin_queued: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Uses `counter` to count successful deliveries (tests wait on it).
    pub fn with_delivery_counter(mut self, counter: tokio::sync::watch::Sender<u64>) -> Self {
        self.delivered = counter;
        self
    }

    /// The number of messages delivered so far, as a watch.
    pub fn deliveries(&self) -> tokio::sync::watch::Receiver<u64> {
        self.delivered.subscribe()
    }

    /// The queue's tree, to include in a transaction.
    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// Whether any notifier takes `message`.
    pub fn deliverable(&self, message: &Message) -> bool {
        self.notifiers.iter().any(|n| n.accepts(message))
    }

    /// Queued deliveries.
    pub fn depth(&self) -> usize {
        self.tree.len()
    }

    fn open_pin(&self, entry: &Entry) -> Result<Option<Pin>, NotifyError> {
        entry
            .sealed_pin
            .as_deref()
            .map(|sealed| self.seal.open(&entry.id, sealed))
            .transpose()
    }

    /// Queues `messages` inside a transaction over [`NotifyQueue::tree`]:
    /// one entry per notifier that takes each message.
    pub fn enqueue(
        &self,
        tx: &TransactionalTree,
        messages: &[Message],
    ) -> Result<(), ConflictableTransactionError<BrokerError>> {
        for message in messages {
            if message.pin.is_some() {
                // (Set again if the transaction runs again: harmless.)
                self.pin_queued
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            for notifier in self.notifiers.iter().filter(|n| n.accepts(message)) {
                // Ordered keys: deliveries go out in the order they were queued.
                let seq = self
                    .next_seq
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let id = format!("{seq:016x}-{}", uuid::Uuid::new_v4());
                let entry = Entry {
                    sealed_pin: message.pin.as_ref().map(|p| self.seal.seal(&id, p)),
                    id: id.clone(),
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
                };
                let bytes = serde_json::to_vec(&entry).map_err(|e| {
                    ConflictableTransactionError::Abort(BrokerError::Store(e.to_string()))
                })?;
                tx.insert(id.as_bytes(), bytes)?;
            }
        }
        Ok(())
    }

    /// Tells the worker that new entries are durable.
    pub fn wake(&self) {
        self.wake.notify_one();
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
        use std::sync::atomic::Ordering::SeqCst;
        // Cleared before the scan: a PIN queued after it sets it again.
        self.pin_queued.store(false, SeqCst);
        let now_ms = millis(self.clock.now());
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
        let mut done = Vec::with_capacity(due.len());
        let mut interrupted = false;
        for entry in due {
            let result = self.deliver(&entry).await;
            done.push((entry, result));
            if self.pin_queued.load(SeqCst) {
                interrupted = true;
                break;
            }
        }
        let tried = done.len();
        if let Err(e) = self.settle(done).await {
            tracing::error!("notification queue: {e}");
        }
        (tried, interrupted)
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

    /// Records what became of each delivery tried, in one transaction: a
    /// delivered entry leaves the queue, a failed one is kept for its retry
    /// or, at the last attempt, replaced by its `notification.failed`
    /// event (then synced, so the event ships).
    async fn settle(&self, done: Vec<(Entry, Result<(), NotifyError>)>) -> Result<(), BrokerError> {
        if done.is_empty() {
            return Ok(());
        }
        let now_ms = millis(self.clock.now());
        let mut writes = Vec::with_capacity(done.len());
        let mut failed_events = Vec::new();
        let mut delivered = 0u64;
        for (mut entry, result) in done {
            match &result {
                Ok(()) => {
                    delivered += 1;
                    tracing::debug!(notifier = %entry.notifier, kind = %entry.kind, request_id = %entry.request_id, "notification delivered");
                    writes.push((entry.id, None));
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
                        failed_events.push(
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
                        writes.push((entry.id, None));
                    } else {
                        entry.next_ms = now_ms.saturating_add(
                            u64::try_from(backoff(entry.attempts).as_millis()).unwrap_or(u64::MAX),
                        );
                        tracing::info!(notifier = %entry.notifier, kind = %entry.kind, request_id = %entry.request_id, attempts = entry.attempts, "notification failed, will retry: {e}");
                        let bytes = serde_json::to_vec(&entry)
                            .map_err(|e| BrokerError::Store(e.to_string()))?;
                        writes.push((entry.id, Some(bytes)));
                    }
                }
            }
        }
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
        if delivered > 0 {
            self.delivered.send_modify(|n| *n += delivered);
        }
        Ok(())
    }

    /// Delivers forever: whenever woken, and at least every second to pick
    /// up retries that came due.
    pub async fn run(self: Arc<Self>) {
        loop {
            let (tried, interrupted) = self.run_pass().await;
            if tried >= DELIVERY_BATCH || interrupted {
                // More may be due (or a PIN was queued): go on at once.
                continue;
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
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
