//! Notifications: what goes to whom when a request changes, a [`Notifier`]
//! trait with mailbox, webhook and Slack implementations, and a durable
//! queue — in sled ([`NotifyQueue`]) or, shared by replicas, in PostgreSQL
//! ([`pg::PgQueue`]) — that retries with exponential backoff and records a
//! notification that finally fails (`notification.failed`).
//!
//! A PIN travels only in a message to the requester. In the queue it is
//! sealed (XChaCha20-Poly1305 under a key derived from the PIN key), so it is
//! never on disk in the clear; it is opened only to hand it to a notifier.

pub mod http;
pub mod mailbox;
pub mod pg;
mod queue;
mod rules;
mod seal;
pub mod slack;
#[cfg(test)]
pub(crate) mod testserver;
pub mod webhook;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use queue::{FIRST_BACKOFF, MAX_ATTEMPTS, MAX_BACKOFF, NotifyQueue};
pub use rules::messages_for;

use crate::pin::Pin;

/// The kind of the message that says the requester's PIN of a request is no
/// longer live (verified, or the request locked, closed or expired): a
/// notifier that keeps PINs (the mailbox) deletes them. Sent to the
/// requester; no other notifier takes it.
pub const PIN_VOID: &str = "pin.void";

/// The kind prefix of an alert from reconciliation (issue 20,
/// `crate::findings`): `reconcile.unexplained`, `reconcile.unprotected`,
/// `reconcile.out_of_band`. Addressed to each admin of the account; Slack
/// sends it to the admin's member id, the webhook takes it, the mailbox too.
pub const FINDING_PREFIX: &str = "reconcile.";

/// Whether a message is a reconciliation alert.
pub fn is_finding(message: &Message) -> bool {
    message.kind.starts_with(FINDING_PREFIX) && message.pin.is_none()
}

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
