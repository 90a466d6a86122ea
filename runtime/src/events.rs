//! Audit events: built by sources, signed with the source's ed25519 event
//! key over the exact encoded bytes, and verified by the audit service and by
//! offline verifiers. An event never carries a seed, PIN or code.

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use prost::Message;
use twokey_proto::audit::v1::{Event, Outcome, SignedEvent};

use crate::identity::SpiffeId;

/// Why a signed event was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    /// The signature is not 64 bytes or does not verify.
    #[error("event signature does not verify")]
    BadSignature,
    /// The event bytes are not a valid Event.
    #[error("event bytes do not decode: {0}")]
    Malformed(String),
}

/// Signs events for one source.
pub struct EventSigner {
    source: SpiffeId,
    key: SigningKey,
}

impl std::fmt::Debug for EventSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSigner")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl EventSigner {
    /// A signer for `source` with its event key.
    pub fn new(source: SpiffeId, key: SigningKey) -> Self {
        Self { source, key }
    }

    /// The source's SPIFFE ID.
    pub fn source(&self) -> &SpiffeId {
        &self.source
    }

    /// The public half, for the audit service's config.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// The source as a witness of the audit log: a C2SP tlog-cosignature
    /// (Ed25519 `cosignature/v1`) cosigner with the event key, named by the
    /// SPIFFE ID without `spiffe://`. One key for both is safe: every event
    /// signed is a protobuf `Event` whose first byte is 0x0a (field 1, the
    /// non-empty source), while every cosigned message starts with
    /// `cosignature/v1\n` (0x63), so neither can pass for the other; and
    /// the source signs only events and cosignatures it made itself.
    pub fn cosigner(&self) -> twokey_tlog::cosignature::Cosigner {
        let name = self
            .source
            .as_str()
            .strip_prefix("spiffe://")
            .unwrap_or(self.source.as_str());
        twokey_tlog::cosignature::Cosigner::new(name, self.key.clone())
            .expect("a SPIFFE ID has no spaces or '+'")
    }

    /// Encodes and signs an event.
    pub fn sign(&self, event: &Event) -> SignedEvent {
        sign_event(&self.key, event)
    }
}

/// Encodes `event` and signs its exact bytes with `key`: the one way an
/// event is signed, by a source and by tests that forge one.
pub fn sign_event(key: &SigningKey, event: &Event) -> SignedEvent {
    let bytes = event.encode_to_vec();
    let signature = key.sign(&bytes).to_bytes().to_vec();
    SignedEvent {
        event: bytes,
        signature,
    }
}

/// Checks a signed event with `verify_strict` and decodes it.
pub fn verify_event(signed: &SignedEvent, key: &VerifyingKey) -> Result<Event, EventError> {
    let signature =
        Signature::from_slice(&signed.signature).map_err(|_| EventError::BadSignature)?;
    key.verify_strict(&signed.event, &signature)
        .map_err(|_| EventError::BadSignature)?;
    Event::decode(signed.event.as_slice()).map_err(|e| EventError::Malformed(e.to_string()))
}

/// What a state change says about itself; the outbox adds source, sequence
/// number and time.
#[derive(Debug, Clone, Default)]
pub struct EventDraft {
    /// Who caused it.
    pub actor: String,
    /// What happened, e.g. `request.created`.
    pub action: String,
    /// Account concerned.
    pub account_id: String,
    /// Request concerned.
    pub request_id: String,
    /// How it ended.
    pub outcome: Outcome,
    /// More facts; never secrets.
    pub attributes: BTreeMap<String, String>,
    /// The call it happened in: its trace id and span, taken when the draft
    /// is made, so the event records them wherever it is written (a group
    /// commit writes it on another thread).
    origin: Origin,
}

/// The trace id and span current when a draft was made.
#[derive(Debug, Clone)]
struct Origin {
    trace_id: Option<String>,
    span: tracing::Span,
}

impl Default for Origin {
    fn default() -> Self {
        Self {
            trace_id: None,
            span: tracing::Span::none(),
        }
    }
}

impl EventDraft {
    /// A successful action by `actor`.
    pub fn new(actor: impl Into<String>, action: impl Into<String>) -> Self {
        Self {
            actor: actor.into(),
            action: action.into(),
            outcome: Outcome::Success,
            origin: Origin {
                trace_id: crate::trace::current(),
                span: tracing::Span::current(),
            },
            ..Self::default()
        }
    }

    /// Sets the account.
    pub fn account(mut self, account_id: impl Into<String>) -> Self {
        self.account_id = account_id.into();
        self
    }

    /// Sets the request.
    pub fn request(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = request_id.into();
        self
    }

    /// Sets the outcome.
    pub fn outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }

    /// Adds an attribute.
    pub fn attr(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(key.into(), value.into());
        self
    }

    /// The event for `source` with sequence number `seq` at `time`, carrying
    /// the trace id and span id of the call the draft was made in.
    pub fn into_event(self, source: &SpiffeId, seq: u64, time: std::time::SystemTime) -> Event {
        let origin = self.origin.clone();
        origin
            .span
            .in_scope(|| self.write(source, seq, time, origin.trace_id))
    }

    fn write(
        self,
        source: &SpiffeId,
        seq: u64,
        time: std::time::SystemTime,
        trace_id: Option<String>,
    ) -> Event {
        let span = tracing::Span::current();
        let span_id = crate::trace::span_context(&span)
            .map(|sc| sc.span_id().to_string())
            .unwrap_or_default();
        crate::trace::record_ids(&self.request_id, &self.account_id);
        tracing::info!(
            action = %self.action,
            seq,
            request_id = %self.request_id,
            account_id = %self.account_id,
            "audit event"
        );
        Event {
            source: source.to_string(),
            seq,
            time: Some(crate::time::to_timestamp(time)),
            actor: self.actor,
            action: self.action,
            account_id: self.account_id,
            request_id: self.request_id,
            outcome: self.outcome as i32,
            trace_id: trace_id.unwrap_or_else(crate::telemetry::current_trace_id),
            attributes: self.attributes,
            span_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> EventSigner {
        EventSigner::new(
            SpiffeId::parse("spiffe://t/svc/vault").unwrap(),
            SigningKey::generate(&mut rand::rngs::OsRng),
        )
    }

    #[tokio::test]
    async fn a_draft_keeps_the_trace_of_the_call_it_was_made_in() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let draft = crate::trace::scope(trace.into(), async {
            EventDraft::new("a", "code.released")
        })
        .await;
        // Written later, on a thread outside the call (as a group commit does).
        let event = std::thread::spawn(move || {
            draft.into_event(signer().source(), 1, std::time::SystemTime::now())
        })
        .join()
        .unwrap();
        assert_eq!(event.trace_id, trace);
    }

    #[test]
    fn signed_events_verify_and_tampering_is_detected() {
        let s = signer();
        let event = EventDraft::new("spiffe://t/user/a", "code.released").into_event(
            s.source(),
            1,
            std::time::SystemTime::now(),
        );
        let signed = s.sign(&event);
        assert_eq!(verify_event(&signed, &s.verifying_key()).unwrap(), event);

        let mut tampered = signed.clone();
        tampered.event[3] ^= 1;
        assert_eq!(
            verify_event(&tampered, &s.verifying_key()),
            Err(EventError::BadSignature)
        );
        assert_eq!(
            verify_event(&signed, &signer().verifying_key()),
            Err(EventError::BadSignature)
        );
    }
}
