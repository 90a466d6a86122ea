//! Notifications: what goes to whom when a request changes, a [`Notifier`]
//! trait with mailbox, webhook and Slack implementations, and a durable
//! queue in sled that retries with exponential backoff and records a
//! notification that finally fails (`notification.failed`).
//!
//! A PIN travels only in a message to the requester. In the queue it is
//! sealed (XChaCha20-Poly1305 under a key derived from the PIN key), so it is
//! never on disk in the clear; it is opened only to hand it to a notifier.

pub mod http;
pub mod mailbox;
pub mod slack;
#[cfg(test)]
pub(crate) mod testserver;
pub mod webhook;

use std::{sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload},
};
use futures::future::BoxFuture;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sled::{
    Transactional,
    transaction::{ConflictableTransactionError, TransactionalTree},
};
use tokio::sync::Notify;
use twokey_proto::audit::v1::Outcome;
use twokey_runtime::{
    SpiffeId, durable::DurableDb, events::EventDraft, outbox::Outbox, time::Clock,
};

use crate::{
    error::BrokerError,
    pin::{Pin, PinKey},
    policy::{Policy, Role},
    state::{RequestRecord, millis},
};

/// Attempts before a notification is given up.
pub const MAX_ATTEMPTS: u32 = 6;
/// Most notifications one pass delivers before it looks for PINs again.
const DELIVERY_BATCH: usize = 64;
/// First retry delay; doubled on each failure.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Who a message is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Recipient {
    /// One person (or service) named in the policy.
    Person {
        /// Policy name.
        name: String,
        /// SPIFFE ID.
        identity: String,
        /// Slack member id, when the policy gives one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slack: Option<String>,
    },
    /// The team channel (Slack channel, webhook, `channel.jsonl`).
    Channel,
}

/// One notification.
#[derive(Debug, Clone)]
pub struct Message {
    /// Unique id (also the webhook delivery id).
    pub id: String,
    /// `pin`, or the action, e.g. `request.created`.
    pub kind: String,
    /// The request.
    pub request_id: String,
    /// The account.
    pub account_id: String,
    /// Who it is for.
    pub to: Recipient,
    /// Human text. For a PIN message it says a PIN was issued; the digits
    /// are in `pin` only.
    pub text: String,
    /// The PIN, only in a `pin` message to the requester.
    pub pin: Option<Pin>,
    /// When it was made, Unix ms.
    pub at_ms: u64,
}

impl Message {
    /// The message as one JSON object — the mailbox line and the webhook
    /// body. Holds the PIN when there is one, so it is zeroized on drop.
    pub fn json_bytes(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let mut json = serde_json::json!({
            "id": self.id,
            "kind": self.kind,
            "request_id": self.request_id,
            "account_id": self.account_id,
            "to": self.to,
            "text": self.text,
            "at_ms": self.at_ms,
        });
        if let Some(pin) = &self.pin {
            json["pin"] = pin.expose().into();
        }
        zeroize::Zeroizing::new(serde_json::to_vec(&json).expect("JSON values serialize"))
    }

    /// The text with the PIN in it, for notifiers that deliver the PIN.
    pub fn text_with_pin(&self) -> String {
        match &self.pin {
            Some(pin) => format!("{} Your PIN: {}", self.text, pin.expose()),
            None => self.text.clone(),
        }
    }
}

/// Why a notifier could not deliver. Never carries the PIN.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct NotifyError(pub String);

/// A way to reach people.
pub trait Notifier: Send + Sync + std::fmt::Debug + 'static {
    /// Short name: `mailbox`, `webhook`, `slack`.
    fn name(&self) -> &'static str;
    /// Whether this notifier takes the message.
    fn accepts(&self, message: &Message) -> bool;
    /// Delivers it.
    fn send<'a>(&'a self, message: &'a Message) -> BoxFuture<'a, Result<(), NotifyError>>;
}

fn person(policy: &Policy, id: &SpiffeId) -> Recipient {
    Recipient::Person {
        name: policy
            .name_of(id)
            .map_or_else(|| id.name().to_owned(), ToOwned::to_owned),
        identity: id.to_string(),
        slack: policy.slack_member(id).map(ToOwned::to_owned),
    }
}

/// The messages a change sends: the PIN to the requester alone; news to the
/// people who must act next and to the channel.
pub fn messages_for(
    policy: &Policy,
    record: &RequestRecord,
    action: &str,
    pin: Option<&Pin>,
    now_ms: u64,
) -> Vec<Message> {
    let account = policy.account(&record.account_id);
    let make = |kind: &str, to: Recipient, text: String, pin: Option<Pin>| Message {
        id: uuid::Uuid::new_v4().to_string(),
        kind: kind.to_owned(),
        request_id: record.id.clone(),
        account_id: record.account_id.clone(),
        to,
        text,
        pin,
        at_ms: now_ms,
    };
    let who = |id: &SpiffeId| {
        policy
            .name_of(id)
            .map_or_else(|| id.to_string(), ToOwned::to_owned)
    };
    let subject = format!(
        "request {} for {} by {}",
        record.id,
        record.account_id,
        who(&record.requester)
    );
    let mut out = Vec::new();
    if let Some(pin) = pin {
        out.push(make(
            "pin",
            person(policy, &record.requester),
            format!(
                "A PIN was issued for your {subject}. Read it out only to the operator on the call."
            ),
            Some(pin.clone()),
        ));
    }
    let role_members = |role: Role| -> Vec<SpiffeId> {
        account
            .map(|a| match role {
                Role::Approver => a.approvers.iter().cloned().collect(),
                Role::Operator => a.operators.iter().cloned().collect(),
                _ => Vec::new(),
            })
            .unwrap_or_default()
    };
    let (people, channel, text): (Vec<SpiffeId>, bool, String) = match action {
        "request.created" => (
            role_members(Role::Approver)
                .into_iter()
                .filter(|id| id != &record.requester)
                .collect(),
            true,
            format!("New {subject}: {}", record.reason),
        ),
        "request.approved" if record.state == crate::state::State::Approved => (
            role_members(Role::Operator)
                .into_iter()
                .filter(|id| {
                    id != &record.requester && !record.approvals.iter().any(|a| &a.approver == id)
                })
                .chain([record.requester.clone()])
                .collect(),
            true,
            format!("Approved: {subject}; waiting for the operator to check the PIN"),
        ),
        "request.denied" => (
            vec![record.requester.clone()],
            true,
            format!("Denied: {subject}"),
        ),
        "request.cancelled" => (
            vec![record.requester.clone()],
            false,
            format!("Cancelled: {subject}"),
        ),
        "request.expired" => (
            vec![record.requester.clone()],
            false,
            format!("Expired: {subject}"),
        ),
        "request.locked" => (
            vec![record.requester.clone()],
            false,
            format!("Locked after too many wrong PINs: {subject}"),
        ),
        "code.released" => (
            vec![record.requester.clone()],
            true,
            format!(
                "Code released ({}/{}): {subject}",
                record.codes_released, record.codes_allowed
            ),
        ),
        _ => (Vec::new(), false, String::new()),
    };
    for id in people {
        out.push(make(action, person(policy, &id), text.clone(), None));
    }
    if channel {
        out.push(make(action, Recipient::Channel, text, None));
    }
    out
}

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
    seal: XChaCha20Poly1305,
    clock: Arc<dyn Clock>,
    wake: Notify,
    delivered: tokio::sync::watch::Sender<u64>,
    next_seq: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for NotifyQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifyQueue")
            .field("notifiers", &self.notifiers)
            .finish_non_exhaustive()
    }
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
        let seal_key = zeroize::Zeroizing::new(key.derive("notification queue seal"));
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
            seal: XChaCha20Poly1305::new(seal_key.as_ref().into()),
            clock,
            wake: Notify::new(),
            delivered: tokio::sync::watch::Sender::new(0),
            next_seq: std::sync::atomic::AtomicU64::new(next_seq),
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

    fn seal_pin(&self, entry_id: &str, pin: &Pin) -> String {
        let mut nonce = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let sealed = self
            .seal
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: pin.expose().as_bytes(),
                    aad: entry_id.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 encryption does not fail");
        B64.encode([nonce.as_slice(), &sealed].concat())
    }

    fn open_pin(&self, entry: &Entry) -> Result<Option<Pin>, NotifyError> {
        let Some(sealed) = &entry.sealed_pin else {
            return Ok(None);
        };
        let bad =
            || NotifyError("the queued PIN cannot be opened (was the PIN key changed?)".into());
        let bytes = B64.decode(sealed).map_err(|_| bad())?;
        if bytes.len() < 24 {
            return Err(bad());
        }
        let (nonce, ct) = bytes.split_at(24);
        let plain = zeroize::Zeroizing::new(
            self.seal
                .decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: ct,
                        aad: entry.id.as_bytes(),
                    },
                )
                .map_err(|_| bad())?,
        );
        let text = std::str::from_utf8(&plain).map_err(|_| bad())?;
        Ok(Some(Pin::from_text(text)))
    }

    /// Queues `messages` inside a transaction over [`NotifyQueue::tree`]:
    /// one entry per notifier that takes each message.
    pub fn enqueue(
        &self,
        tx: &TransactionalTree,
        messages: &[Message],
    ) -> Result<(), ConflictableTransactionError<BrokerError>> {
        for message in messages {
            for notifier in self.notifiers.iter().filter(|n| n.accepts(message)) {
                // Ordered keys: deliveries go out in the order they were queued.
                let seq = self
                    .next_seq
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let id = format!("{seq:016x}-{}", uuid::Uuid::new_v4());
                let entry = Entry {
                    sealed_pin: message.pin.as_ref().map(|p| self.seal_pin(&id, p)),
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
        let now_ms = millis(self.clock.now());
        // PINs first: a requester is waiting on the call for theirs, while
        // the rest only tell people about a change. A bounded batch, so a
        // PIN queued behind a burst of such messages waits for at most one
        // batch, not the burst, and a long queue is never all in memory.
        let mut due = Vec::new();
        let mut others = Vec::new();
        for entry in self
            .tree
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(_, v)| serde_json::from_slice::<Entry>(&v).ok())
            .filter(|e| e.next_ms <= now_ms)
        {
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
        let tried = due.len();
        for entry in due {
            let result = self.deliver(&entry).await;
            if let Err(e) = self.settle(entry, result).await {
                tracing::error!("notification queue: {e}");
            }
        }
        tried
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

    async fn settle(
        &self,
        mut entry: Entry,
        result: Result<(), NotifyError>,
    ) -> Result<(), BrokerError> {
        let now_ms = millis(self.clock.now());
        let mut failed_event = None;
        match &result {
            Ok(()) => {
                tracing::debug!(notifier = %entry.notifier, kind = %entry.kind, request_id = %entry.request_id, "notification delivered");
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
                    failed_event = Some(
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
                } else {
                    entry.next_ms = now_ms.saturating_add(
                        u64::try_from(backoff(entry.attempts).as_millis()).unwrap_or(u64::MAX),
                    );
                    tracing::info!(notifier = %entry.notifier, kind = %entry.kind, request_id = %entry.request_id, attempts = entry.attempts, "notification failed, will retry: {e}");
                }
            }
        }
        let keep = result.is_err() && failed_event.is_none();
        let bytes = serde_json::to_vec(&entry).map_err(|e| BrokerError::Store(e.to_string()))?;
        (&self.tree, self.outbox.tree())
            .transaction(|(q, o)| {
                if keep {
                    q.insert(entry.id.as_bytes(), bytes.clone())?;
                } else {
                    q.remove(entry.id.as_bytes())?;
                }
                if let Some(event) = &failed_event {
                    self.outbox.push::<BrokerError>(o, event.clone())?;
                }
                Ok(())
            })
            .map_err(|e: sled::transaction::TransactionError<BrokerError>| {
                BrokerError::Store(e.to_string())
            })?;
        if failed_event.is_some() {
            self.db.sync().await?;
            self.outbox.committed();
        }
        if result.is_ok() {
            self.delivered.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// Delivers forever: whenever woken, and at least every second to pick
    /// up retries that came due.
    pub async fn run(self: Arc<Self>) {
        loop {
            if self.run_due().await >= DELIVERY_BATCH {
                // More may be due: go on at once.
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
    use std::sync::Mutex;
    use twokey_runtime::{events::EventSigner, keys::SecretKey, time::ManualClock};

    #[derive(Debug, Default)]
    struct Flaky {
        fail: bool,
        seen: Mutex<Vec<(String, Option<String>)>>,
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
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
