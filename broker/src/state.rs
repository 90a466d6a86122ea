//! The request state machine: the stored record of a request and the rules
//! of every action on it, as pure functions of (record, account policy,
//! caller, time). Only the transitions drawn in DESIGN.md happen:
//!
//! ```text
//! PENDING ──approve×N──▶ APPROVED ──verify PIN──▶ VERIFIED ──release──▶ RELEASED
//!    │ deny/cancel/expire    │ deny/cancel/expire     │ expire
//!    ▼                       ▼  wrong PIN × max       ▼
//!  DENIED / CANCELLED / EXPIRED      LOCKED          EXPIRED
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use twokey_proto::audit::v1::Outcome;
use twokey_runtime::{SpiffeId, events::EventDraft};

use crate::{
    consent::RequestConsent,
    error::BrokerError,
    pin::{Pin, PinKey},
    policy::{AccountPolicy, Delivery, Role},
    store::Claim,
};

/// How many times a requester may ask for a new PIN.
pub const MAX_PIN_RESENDS: u32 = 3;
/// Longest reason or comment.
pub const MAX_REASON: usize = 1000;
/// Longest ticket reference.
pub const MAX_TICKET: usize = 200;

/// Where a request is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum State {
    /// Waiting for approvals.
    Pending,
    /// Approved; the PIN went to the requester.
    Approved,
    /// The operator verified the PIN.
    Verified,
    /// All codes released. Final.
    Released,
    /// Denied. Final.
    Denied,
    /// Cancelled. Final.
    Cancelled,
    /// Ran out of time. Final.
    Expired,
    /// Too many wrong PINs. Final.
    Locked,
}

impl State {
    /// Whether nothing more can happen.
    pub fn is_final(self) -> bool {
        !matches!(self, State::Pending | State::Approved | State::Verified)
    }

    /// Whether the diagram has an arrow from `self` to `to`.
    pub fn can_become(self, to: State) -> bool {
        use State::*;
        matches!(
            (self, to),
            (Pending, Approved | Denied | Cancelled | Expired)
                | (Approved, Verified | Denied | Cancelled | Expired | Locked)
                | (Verified, Released | Expired)
        )
    }

    /// The name used in messages and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "PENDING",
            State::Approved => "APPROVED",
            State::Verified => "VERIFIED",
            State::Released => "RELEASED",
            State::Denied => "DENIED",
            State::Cancelled => "CANCELLED",
            State::Expired => "EXPIRED",
            State::Locked => "LOCKED",
        }
    }
}

/// One approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRecord {
    /// Who approved.
    pub approver: SpiffeId,
    /// Their comment.
    pub comment: String,
    /// When, in Unix milliseconds.
    pub at_ms: u64,
}

/// One step in a request's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    /// When, in Unix milliseconds.
    pub at_ms: u64,
    /// Who (or the broker itself).
    pub actor: String,
    /// What happened.
    pub action: String,
    /// The state after it.
    pub state: State,
    /// A comment or reason.
    pub comment: String,
}

/// A request as stored. The PIN is kept only as its keyed hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Unique id.
    pub id: String,
    /// The account.
    pub account_id: String,
    /// Who needs the code.
    pub requester: SpiffeId,
    /// Who filed it (the requester or an intake service).
    pub filed_by: SpiffeId,
    /// Why.
    pub reason: String,
    /// Ticket reference.
    pub ticket: String,
    /// Current state.
    pub state: State,
    /// Approvals so far.
    pub approvals: Vec<ApprovalRecord>,
    /// Approvals needed (from the policy when filed).
    pub approvals_required: u32,
    /// The operator who verified the PIN.
    pub operator: Option<SpiffeId>,
    /// HMAC of the current PIN, hex; `None` when no PIN is valid.
    pub pin_hash: Option<String>,
    /// The current PIN sealed for this request ([`PinKey::seal`]), kept
    /// only while it is live so its requester can be shown it; dropped with
    /// `pin_hash` (verified, locked, closed, expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_sealed: Option<String>,
    /// Wrong PINs so far.
    pub pin_attempts: u32,
    /// Wrong PINs that lock it.
    pub pin_max_attempts: u32,
    /// Digits of its PINs.
    pub pin_length: u32,
    /// New PINs sent on request.
    pub pin_resends: u32,
    /// Codes released (or being released) so far.
    pub codes_released: u32,
    /// Codes it may release.
    pub codes_allowed: u32,
    /// Who gets the code.
    pub delivery: Delivery,
    /// How long it may wait for release once approved, in seconds.
    pub release_window_secs: u64,
    /// Filed at, Unix ms.
    pub created_ms: u64,
    /// Last change, Unix ms.
    pub updated_ms: u64,
    /// Expires at, Unix ms.
    pub expires_ms: u64,
    /// Everything that happened, oldest first.
    pub history: Vec<HistoryRecord>,
    /// The people's signed statements, when the request was filed with one
    /// (none for requests filed without, and those stored before there were
    /// statements).
    #[serde(default)]
    pub consent: Option<RequestConsent>,
}

/// What an action does besides changing the record: audit events, and the
/// notifications the service turns into messages.
#[derive(Debug, Default)]
pub struct Effects {
    /// What happened, e.g. `request.approved` (for watchers and notifiers).
    pub action: String,
    /// Audit events to write with the change.
    pub events: Vec<EventDraft>,
    /// A new PIN for the requester.
    pub pin: Option<Pin>,
    /// An error to return once the change is stored (a wrong PIN, an expiry).
    pub fail: Option<BrokerError>,
    /// Ids the change uses up for good (grant and release ids).
    pub claims: Vec<Claim>,
}

/// Unix milliseconds of an instant.
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// RFC 3339 UTC text of Unix milliseconds, to the second.
pub fn rfc3339(ms: u64) -> String {
    twokey_runtime::time::rfc3339(UNIX_EPOCH + Duration::from_millis(ms))
}

fn check_text(field: &str, text: &str, max: usize, required: bool) -> Result<(), BrokerError> {
    if required && text.trim().is_empty() {
        return Err(BrokerError::invalid(format!(
            "{field} is required; say why"
        )));
    }
    if text.chars().count() > max {
        return Err(BrokerError::invalid(format!(
            "{field} is longer than {max} characters; shorten it"
        )));
    }
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(BrokerError::invalid(format!(
            "{field} holds control characters; remove them"
        )));
    }
    Ok(())
}

/// `n` and the noun that counts it: "1 code", "2 codes".
pub fn count(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The error for an identity that lacks `role` on `account`.
pub fn lacks_role(id: &SpiffeId, role: Role, account: &str) -> BrokerError {
    let article = if role == Role::Approver
        || role == Role::Operator
        || role == Role::Admin
        || role == Role::Intake
    {
        "an"
    } else {
        "a"
    };
    BrokerError::denied(format!(
        "{id} is not {article} {} for {account}; ask an admin to add you to the policy",
        role.as_str()
    ))
}

impl RequestRecord {
    /// Files a new request, PENDING.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        id: String,
        account: &AccountPolicy,
        caller: &SpiffeId,
        on_behalf_of: Option<SpiffeId>,
        reason: &str,
        ticket: &str,
        now: SystemTime,
    ) -> Result<(Self, Effects), BrokerError> {
        check_text("reason", reason, MAX_REASON, true)?;
        check_text("ticket", ticket, MAX_TICKET, false)?;
        let requester = match on_behalf_of {
            Some(requester) => {
                if !account.has(caller, Role::Intake) {
                    return Err(BrokerError::denied(format!(
                        "{caller} is not an intake service for {}; only intake services file on someone's behalf — leave on_behalf_of empty",
                        account.id
                    )));
                }
                if &requester == caller {
                    return Err(BrokerError::invalid(
                        "an intake service cannot file on its own behalf",
                    ));
                }
                if !account.has(&requester, Role::Requester) {
                    return Err(lacks_role(&requester, Role::Requester, &account.id));
                }
                requester
            }
            None => {
                if account.has(caller, Role::Intake) && !account.has(caller, Role::Requester) {
                    return Err(BrokerError::invalid(format!(
                        "{caller} is an intake service: name the requester in on_behalf_of"
                    )));
                }
                if !account.has(caller, Role::Requester) {
                    return Err(lacks_role(caller, Role::Requester, &account.id));
                }
                caller.clone()
            }
        };
        let now_ms = millis(now);
        let mut record = Self {
            id,
            account_id: account.id.clone(),
            requester,
            filed_by: caller.clone(),
            reason: reason.to_owned(),
            ticket: ticket.to_owned(),
            state: State::Pending,
            approvals: Vec::new(),
            approvals_required: account.approvals_required,
            operator: None,
            pin_hash: None,
            pin_sealed: None,
            pin_attempts: 0,
            pin_max_attempts: account.pin_max_attempts,
            pin_length: account.pin_length,
            pin_resends: 0,
            codes_released: 0,
            codes_allowed: account.codes_per_request,
            delivery: account.delivery,
            release_window_secs: account.release_window.as_secs(),
            created_ms: now_ms,
            updated_ms: now_ms,
            expires_ms: now_ms.saturating_add(millis_of(account.request_ttl)),
            history: Vec::new(),
            consent: None,
        };
        let mut effects = Effects::default();
        record.record(&mut effects, caller, "request.created", None, reason, now);
        effects.events[0]
            .attributes
            .insert("requester".into(), record.requester.to_string());
        if !record.ticket.is_empty() {
            effects.events[0]
                .attributes
                .insert("ticket".into(), record.ticket.clone());
        }
        Ok((record, effects))
    }

    /// Adds a history entry and an audit event; moves to `to` if given.
    fn record(
        &mut self,
        effects: &mut Effects,
        actor: &dyn std::fmt::Display,
        action: &str,
        to: Option<State>,
        comment: &str,
        now: SystemTime,
    ) {
        if let Some(to) = to {
            debug_assert!(
                self.state.can_become(to),
                "{:?} -> {to:?} is not drawn",
                self.state
            );
            self.state = to;
        }
        let at_ms = millis(now);
        self.updated_ms = at_ms;
        self.history.push(HistoryRecord {
            at_ms,
            actor: actor.to_string(),
            action: action.to_owned(),
            state: self.state,
            comment: comment.to_owned(),
        });
        effects.action = action.to_owned();
        effects.events.push(
            EventDraft::new(actor.to_string(), action)
                .account(&self.account_id)
                .request(&self.id)
                .attr("state", self.state.as_str()),
        );
    }

    /// A new PIN for the requester: its hash to check it and its sealed
    /// copy to show it; any PIN before it stops working.
    fn issue_pin(&mut self, key: &PinKey) -> Pin {
        let pin = Pin::generate(self.pin_length);
        self.pin_hash = Some(hex::encode(key.hash(&self.id, &pin)));
        self.pin_sealed = Some(key.seal(&self.id, &pin));
        pin
    }

    /// No PIN works any more: hash and sealed copy are dropped.
    fn void_pin(&mut self) {
        self.pin_hash = None;
        self.pin_sealed = None;
    }

    /// The live PIN, for its requester alone: refused to anyone else
    /// (permission denied), and when the request has no live PIN (failed
    /// precondition, saying what to do). Call it after expiring the request
    /// if its time ran out.
    pub fn live_pin(
        &self,
        caller: &SpiffeId,
        key: &PinKey,
        now: SystemTime,
    ) -> Result<Pin, BrokerError> {
        if caller != &self.requester {
            return Err(BrokerError::denied(format!(
                "{caller} is not the requester of {}; only the requester may see its PIN",
                self.id
            )));
        }
        if self.is_due(now) {
            return Err(self.expired_error());
        }
        let none_live = |why: &str| {
            BrokerError::precondition(format!("request {} has no live PIN: {why}", self.id))
        };
        match self.state {
            State::Approved => {}
            State::Pending => {
                return Err(none_live(
                    "it still needs approvals; the PIN is made when it is approved",
                ));
            }
            State::Verified | State::Released => {
                return Err(none_live(
                    "the operator already verified it; it is not needed any more",
                ));
            }
            State::Expired => return Err(self.expired_error()),
            State::Denied | State::Cancelled | State::Locked => {
                return Err(none_live(&format!(
                    "it is {}; file a new request",
                    self.state.as_str()
                )));
            }
        }
        self.pin_sealed
            .as_deref()
            .and_then(|sealed| key.open(&self.id, sealed))
            .ok_or_else(|| {
                none_live(
                    "the broker kept no copy of this one (it was issued before PINs could be shown, or the PIN key changed); ask for a new one with `twokey pin resend`",
                )
            })
    }

    fn move_to(&mut self, to: State) -> Result<(), BrokerError> {
        if self.state.can_become(to) {
            Ok(())
        } else {
            Err(BrokerError::Store(format!(
                "internal: {} -> {} is not an allowed transition",
                self.state.as_str(),
                to.as_str()
            )))
        }
    }

    /// Whether the request ran out of time at `now`.
    pub fn is_due(&self, now: SystemTime) -> bool {
        !self.state.is_final() && millis(now) >= self.expires_ms
    }

    /// Expires the request if its time ran out; the effects of doing so.
    pub fn expire_if_due(&mut self, now: SystemTime) -> Option<Effects> {
        if !self.is_due(now) {
            return None;
        }
        let mut effects = Effects::default();
        self.void_pin();
        let comment = format!("expired at {}", rfc3339(self.expires_ms));
        self.record(
            &mut effects,
            &"broker",
            "request.expired",
            Some(State::Expired),
            &comment,
            now,
        );
        effects.fail = Some(self.expired_error());
        Some(effects)
    }

    fn expired_error(&self) -> BrokerError {
        BrokerError::precondition(format!(
            "request {} expired at {}; file a new request",
            self.id,
            rfc3339(self.expires_ms)
        ))
    }

    fn wrong_state(&self, action: &str, wanted: &[State]) -> BrokerError {
        if self.state == State::Expired {
            return self.expired_error();
        }
        let wanted: Vec<&str> = wanted.iter().map(|s| s.as_str()).collect();
        let hint = match self.state {
            State::Pending => "it still needs approvals",
            State::Approved => "the operator must verify the PIN first",
            State::Verified => "the PIN is already verified",
            State::Released => "all its codes were released; file a new request",
            State::Denied | State::Cancelled | State::Locked => "it is closed; file a new request",
            State::Expired => "file a new request",
        };
        BrokerError::precondition(format!(
            "cannot {action} request {}: it is {}, not {} ({hint})",
            self.id,
            self.state.as_str(),
            wanted.join(" or ")
        ))
    }

    fn require_state(&self, action: &str, wanted: &[State]) -> Result<(), BrokerError> {
        if wanted.contains(&self.state) {
            Ok(())
        } else {
            Err(self.wrong_state(action, wanted))
        }
    }

    fn approved_by(&self, id: &SpiffeId) -> bool {
        self.approvals.iter().any(|a| &a.approver == id)
    }

    /// Whether `id` may see this request: the people on it, and those with
    /// a role on its account other than requester or intake.
    pub fn visible_to(&self, account: Option<&AccountPolicy>, id: &SpiffeId) -> bool {
        &self.requester == id
            || &self.filed_by == id
            || self.operator.as_ref() == Some(id)
            || self.approved_by(id)
            || account.is_some_and(|a| {
                a.has(id, Role::Approver) || a.has(id, Role::Operator) || a.has(id, Role::Admin)
            })
    }

    /// An approver approves; at the threshold the request becomes APPROVED
    /// and a PIN is made for the requester.
    pub fn approve(
        &mut self,
        account: &AccountPolicy,
        caller: &SpiffeId,
        comment: &str,
        key: &PinKey,
        now: SystemTime,
    ) -> Result<Effects, BrokerError> {
        check_text("comment", comment, MAX_REASON, false)?;
        let approver = account.has(caller, Role::Approver);
        let own = |how: &str| {
            BrokerError::denied(format!(
                "{caller} {how} request {}; nobody approves their own request — another approver must",
                self.id
            ))
        };
        // Her own request first, whatever other roles the requester has.
        if caller == &self.requester {
            return Err(own("is the requester of"));
        }
        if !approver && account.has(caller, Role::Intake) {
            return Err(BrokerError::denied(format!(
                "{caller} is an intake service for {}; intake services file requests and never approve",
                self.account_id
            )));
        }
        if caller == &self.filed_by {
            return Err(own("filed"));
        }
        if !approver {
            return Err(lacks_role(caller, Role::Approver, &self.account_id));
        }
        if self.approved_by(caller) {
            let n = self.approvals_required;
            return Err(BrokerError::denied(format!(
                "{caller} already approved request {}; it needs {n} {} from different people",
                self.id,
                if n == 1 { "approval" } else { "approvals" }
            )));
        }
        if self.operator.as_ref() == Some(caller) {
            return Err(BrokerError::denied(format!(
                "{caller} is the operator of request {}; the operator cannot approve",
                self.id
            )));
        }
        self.require_state("approve", &[State::Pending])?;
        self.approvals.push(ApprovalRecord {
            approver: caller.clone(),
            comment: comment.to_owned(),
            at_ms: millis(now),
        });
        let mut effects = Effects::default();
        let reached = self.approvals.len() as u64 >= u64::from(self.approvals_required);
        if reached {
            self.move_to(State::Approved)?;
            self.expires_ms =
                millis(now).saturating_add(self.release_window_secs.saturating_mul(1000));
            self.record(
                &mut effects,
                caller,
                "request.approved",
                Some(State::Approved),
                comment,
                now,
            );
            effects.pin = Some(self.issue_pin(key));
            effects.events.push(
                EventDraft::new("broker", "pin.issued")
                    .account(&self.account_id)
                    .request(&self.id)
                    .attr("to", self.requester.to_string()),
            );
        } else {
            self.record(&mut effects, caller, "request.approved", None, comment, now);
        }
        if let Some(e) = effects.events.first_mut() {
            e.attributes.insert(
                "approvals".into(),
                format!("{}/{}", self.approvals.len(), self.approvals_required),
            );
        }
        Ok(effects)
    }

    /// An approver denies.
    pub fn deny(
        &mut self,
        account: &AccountPolicy,
        caller: &SpiffeId,
        reason: &str,
        now: SystemTime,
    ) -> Result<Effects, BrokerError> {
        check_text("reason", reason, MAX_REASON, true)?;
        if !account.has(caller, Role::Approver) {
            return Err(lacks_role(caller, Role::Approver, &self.account_id));
        }
        if caller == &self.requester {
            return Err(BrokerError::denied(format!(
                "{caller} is the requester of {}; to withdraw it, cancel it with `twokey request cancel {}`",
                self.id, self.id
            )));
        }
        self.require_state("deny", &[State::Pending, State::Approved])?;
        self.move_to(State::Denied)?;
        self.void_pin();
        let mut effects = Effects::default();
        self.record(
            &mut effects,
            caller,
            "request.denied",
            Some(State::Denied),
            reason,
            now,
        );
        Ok(effects)
    }

    /// The requester (or the intake service that filed it) cancels.
    pub fn cancel(
        &mut self,
        caller: &SpiffeId,
        reason: &str,
        now: SystemTime,
    ) -> Result<Effects, BrokerError> {
        check_text("reason", reason, MAX_REASON, false)?;
        if caller != &self.requester && caller != &self.filed_by {
            return Err(BrokerError::denied(format!(
                "{caller} is not the requester of {}; only its requester may cancel it (approvers deny)",
                self.id
            )));
        }
        self.require_state("cancel", &[State::Pending, State::Approved])?;
        self.move_to(State::Cancelled)?;
        self.void_pin();
        let mut effects = Effects::default();
        self.record(
            &mut effects,
            caller,
            "request.cancelled",
            Some(State::Cancelled),
            reason,
            now,
        );
        Ok(effects)
    }

    /// The operator submits the PIN the requester read out. A wrong PIN is
    /// counted (and the count stored) before the error is returned.
    pub fn verify_pin(
        &mut self,
        account: &AccountPolicy,
        caller: &SpiffeId,
        pin: &Pin,
        key: &PinKey,
        now: SystemTime,
    ) -> Result<Effects, BrokerError> {
        if !account.has(caller, Role::Operator) {
            return Err(lacks_role(caller, Role::Operator, &self.account_id));
        }
        if caller == &self.requester || caller == &self.filed_by {
            return Err(BrokerError::denied(format!(
                "{caller} is the requester of {}; a different operator must verify the PIN",
                self.id
            )));
        }
        if self.approved_by(caller) {
            return Err(BrokerError::denied(format!(
                "{caller} approved request {}; the operator must be someone who did not approve it",
                self.id
            )));
        }
        self.require_state("verify the PIN of", &[State::Approved])?;
        if pin.expose().is_empty() {
            return Err(BrokerError::invalid(
                "pin is empty; type the digits the requester reads out",
            ));
        }
        // A typo that cannot be a PIN is not a guess: it spends no attempt.
        let typed = pin.expose();
        let wrong_length = self.pin_length != 0 && typed.len() != self.pin_length as usize;
        if !typed.bytes().all(|b| b.is_ascii_digit()) || wrong_length {
            return Err(BrokerError::invalid(format!(
                "a PIN of request {} is {} digits and nothing else; check what the requester \
                 reads out and type it again (no attempt was counted)",
                self.id, self.pin_length
            )));
        }
        let stored = self
            .pin_hash
            .as_deref()
            .and_then(|h| hex::decode(h).ok())
            .unwrap_or_default();
        let mut effects = Effects::default();
        if !stored.is_empty() && key.verify(&self.id, pin, &stored) {
            self.move_to(State::Verified)?;
            self.void_pin();
            self.operator = Some(caller.clone());
            self.record(
                &mut effects,
                caller,
                "pin.verified",
                Some(State::Verified),
                "",
                now,
            );
            return Ok(effects);
        }
        self.pin_attempts += 1;
        let left = self.pin_max_attempts.saturating_sub(self.pin_attempts);
        if left == 0 {
            self.move_to(State::Locked)?;
            self.void_pin();
            self.record(&mut effects, caller, "pin.failed", None, "", now);
            self.record(
                &mut effects,
                caller,
                "request.locked",
                Some(State::Locked),
                "too many wrong PINs",
                now,
            );
            effects.fail = Some(BrokerError::precondition(format!(
                "wrong PIN; request {} is now LOCKED after {} — file a new request",
                self.id,
                count(self.pin_attempts, "wrong PIN", "wrong PINs")
            )));
        } else {
            self.record(&mut effects, caller, "pin.failed", None, "", now);
            effects.fail = Some(BrokerError::invalid(format!(
                "wrong PIN for request {}; {left} {} left before it locks",
                self.id,
                if left == 1 { "try" } else { "tries" }
            )));
        }
        for e in &mut effects.events {
            e.outcome = Outcome::Denied;
            e.attributes
                .insert("pin_attempts".into(), self.pin_attempts.to_string());
        }
        Ok(effects)
    }

    /// The requester asks for a new PIN; the old one stops working.
    pub fn resend_pin(
        &mut self,
        caller: &SpiffeId,
        key: &PinKey,
        now: SystemTime,
    ) -> Result<Effects, BrokerError> {
        if caller != &self.requester {
            return Err(BrokerError::denied(format!(
                "{caller} is not the requester of {}; only the requester may ask for a new PIN",
                self.id
            )));
        }
        self.require_state("resend the PIN of", &[State::Approved])?;
        if self.pin_resends >= MAX_PIN_RESENDS {
            return Err(BrokerError::precondition(format!(
                "the PIN of request {} was already resent {MAX_PIN_RESENDS} times; file a new request",
                self.id
            )));
        }
        self.pin_resends += 1;
        let pin = self.issue_pin(key);
        let mut effects = Effects::default();
        self.record(&mut effects, caller, "pin.resent", None, "", now);
        effects.pin = Some(pin);
        Ok(effects)
    }

    /// Checks that `caller` may release a code now and reserves one from the
    /// quota; the code is fetched from the vault afterwards.
    pub fn reserve_release(
        &mut self,
        account: &AccountPolicy,
        caller: &SpiffeId,
        grant_id: &str,
        now: SystemTime,
    ) -> Result<Effects, BrokerError> {
        match self.delivery {
            Delivery::Operator => {
                if !account.has(caller, Role::Operator) {
                    return Err(lacks_role(caller, Role::Operator, &self.account_id));
                }
                if self.state == State::Verified && self.operator.as_ref() != Some(caller) {
                    return Err(BrokerError::denied(format!(
                        "{caller} did not verify the PIN of request {}; only its operator may release the code",
                        self.id
                    )));
                }
            }
            Delivery::Requester => {
                if caller != &self.requester {
                    return Err(BrokerError::denied(format!(
                        "{caller} is not the requester of {}; with delivery = \"requester\" only the requester releases the code",
                        self.id
                    )));
                }
            }
        }
        self.require_state("release a code for", &[State::Verified])?;
        if self.codes_released >= self.codes_allowed {
            return Err(BrokerError::precondition(format!(
                "request {} already released the {} it allows; file a new request",
                self.id,
                count(self.codes_allowed, "code", "codes")
            )));
        }
        self.codes_released += 1;
        let mut effects = Effects::default();
        self.record(&mut effects, caller, "grant.issued", None, "", now);
        effects.events[0]
            .attributes
            .insert("grant_id".into(), grant_id.to_owned());
        Ok(effects)
    }

    /// Records the vault's answer to a reserved release.
    pub fn finish_release(
        &mut self,
        caller: &SpiffeId,
        grant_id: &str,
        result: Result<u64, (&str, bool)>,
        now: SystemTime,
    ) -> Effects {
        let mut effects = Effects::default();
        match result {
            Ok(step) => {
                let to = (self.codes_released >= self.codes_allowed
                    && self.state == State::Verified)
                    .then_some(State::Released);
                self.record(&mut effects, caller, "code.released", to, "", now);
                let e = &mut effects.events[0];
                e.attributes.insert("grant_id".into(), grant_id.to_owned());
                e.attributes.insert("step".into(), step.to_string());
                e.attributes.insert(
                    "codes".into(),
                    format!("{}/{}", self.codes_released, self.codes_allowed),
                );
            }
            Err((why, refund)) => {
                if refund {
                    self.codes_released = self.codes_released.saturating_sub(1);
                }
                self.record(&mut effects, caller, "code.release_failed", None, why, now);
                let e = &mut effects.events[0];
                e.outcome = Outcome::Failure;
                e.attributes.insert("grant_id".into(), grant_id.to_owned());
                e.attributes.insert("error".into(), why.to_owned());
            }
        }
        effects
    }
}

fn millis_of(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_in_messages_agree_with_their_noun() {
        assert_eq!(count(1u32, "code", "codes"), "1 code");
        assert_eq!(count(0u32, "code", "codes"), "0 codes");
        assert_eq!(count(2u64, "wrong PIN", "wrong PINs"), "2 wrong PINs");
    }

    #[test]
    fn times_in_messages_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_900_003_600_999), "2030-03-17T18:46:40Z");
    }

    /// Account `acct` with one requester and, if given, one approver and
    /// one operator: one approval, one code, a 6-digit PIN, 3 attempts.
    fn test_account(
        requester: &SpiffeId,
        approver: Option<&SpiffeId>,
        operator: Option<&SpiffeId>,
    ) -> AccountPolicy {
        AccountPolicy {
            id: "acct".into(),
            requesters: [requester.clone()].into(),
            approvers: approver.into_iter().cloned().collect(),
            operators: operator.into_iter().cloned().collect(),
            admins: Default::default(),
            intake: Default::default(),
            approvals_required: 1,
            request_ttl: Duration::from_secs(3600),
            release_window: Duration::from_secs(900),
            codes_per_request: 1,
            pin_length: 6,
            pin_max_attempts: 3,
            delivery: Delivery::Operator,
        }
    }

    #[test]
    fn records_stored_before_statements_still_load() {
        let id = SpiffeId::parse("spiffe://t.local/user/alice").unwrap();
        let account = test_account(&id, None, None);
        let (record, _) =
            RequestRecord::create("r1".into(), &account, &id, None, "why", "", UNIX_EPOCH).unwrap();
        let mut json = serde_json::to_value(&record).unwrap();
        json.as_object_mut().unwrap().remove("consent").unwrap();
        let old: RequestRecord = serde_json::from_value(json).unwrap();
        assert_eq!(old, record);
        assert!(old.consent.is_none());
    }

    #[test]
    fn the_sealed_pin_lives_exactly_as_long_as_the_pin() {
        let id = |name: &str| SpiffeId::parse(&format!("spiffe://t.local/user/{name}")).unwrap();
        let (alice, bob, olivia) = (id("alice"), id("bob"), id("olivia"));
        let account = test_account(&alice, Some(&bob), Some(&olivia));
        let key = PinKey::new(twokey_runtime::keys::SecretKey::from_bytes([5; 32]));
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let approved = || {
            let (mut r, _) =
                RequestRecord::create("r1".into(), &account, &alice, None, "why", "", now).unwrap();
            let pin = r
                .approve(&account, &bob, "", &key, now)
                .unwrap()
                .pin
                .unwrap();
            (r, pin)
        };
        let (r, pin) = approved();
        assert_eq!(r.live_pin(&alice, &key, now).unwrap(), pin);
        assert!(matches!(
            r.live_pin(&bob, &key, now),
            Err(BrokerError::PermissionDenied(_))
        ));
        // Resent: the new one is shown.
        let mut resent = r.clone();
        let new = resent.resend_pin(&alice, &key, now).unwrap().pin.unwrap();
        assert_eq!(resent.live_pin(&alice, &key, now).unwrap(), new);
        // Verified, locked, cancelled, denied, expired: hash and seal gone.
        let mut verified = r.clone();
        verified
            .verify_pin(&account, &olivia, &pin, &key, now)
            .unwrap();
        let mut locked = r.clone();
        let wrong = Pin::from_text(if pin.expose() == "000000" {
            "111111"
        } else {
            "000000"
        });
        for _ in 0..3 {
            locked
                .verify_pin(&account, &olivia, &wrong, &key, now)
                .unwrap();
        }
        let mut cancelled = r.clone();
        cancelled.cancel(&alice, "", now).unwrap();
        let mut denied = r.clone();
        denied.deny(&account, &bob, "no", now).unwrap();
        let mut expired = r.clone();
        let later = now + Duration::from_secs(901);
        assert!(expired.expire_if_due(later).is_some());
        for (what, gone) in [
            ("verified", verified),
            ("locked", locked),
            ("cancelled", cancelled),
            ("denied", denied),
            ("expired", expired),
        ] {
            assert_eq!((&gone.pin_hash, &gone.pin_sealed), (&None, &None), "{what}");
            assert!(
                matches!(
                    gone.live_pin(&alice, &key, later),
                    Err(BrokerError::FailedPrecondition(_))
                ),
                "{what}"
            );
        }
        // Due but not yet expired in storage: no PIN either.
        assert!(matches!(
            r.live_pin(&alice, &key, later),
            Err(BrokerError::FailedPrecondition(_))
        ));
    }

    #[test]
    fn only_the_drawn_transitions_are_allowed() {
        use State::*;
        let all = [
            Pending, Approved, Verified, Released, Denied, Cancelled, Expired, Locked,
        ];
        let drawn = [
            (Pending, Approved),
            (Pending, Denied),
            (Pending, Cancelled),
            (Pending, Expired),
            (Approved, Verified),
            (Approved, Denied),
            (Approved, Cancelled),
            (Approved, Expired),
            (Approved, Locked),
            (Verified, Released),
            (Verified, Expired),
        ];
        for from in all {
            for to in all {
                assert_eq!(
                    from.can_become(to),
                    drawn.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
            assert_eq!(
                from.is_final(),
                !matches!(from, Pending | Approved | Verified)
            );
        }
    }
}
