//! Property test: random action sequences by random identities, checked
//! against a small reference model of the rules, plus invariants that must
//! hold whatever happens (distinct identities, drawn transitions, quota).

use std::{
    collections::BTreeSet,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use proptest::prelude::*;
use twokey_broker::{
    error::BrokerError,
    pin::{Pin, PinKey},
    policy::{AccountPolicy, Delivery},
    state::{MAX_PIN_RESENDS, RequestRecord, State},
};
use twokey_runtime::{SpiffeId, keys::SecretKey};

const PEOPLE: [&str; 7] = ["alice", "rita", "bob", "dave", "olivia", "bpm", "carol"];

fn id(name: &str) -> SpiffeId {
    let kind = if name == "bpm" { "svc" } else { "user" };
    SpiffeId::parse(&format!("spiffe://t.local/{kind}/{name}")).unwrap()
}

fn set(names: &[&str]) -> BTreeSet<SpiffeId> {
    names.iter().map(|n| id(n)).collect()
}

fn account(required: u32, codes: u32) -> AccountPolicy {
    AccountPolicy {
        id: "acct".into(),
        requesters: set(&["alice", "rita"]),
        approvers: set(&["bob", "dave", "rita"]),
        operators: set(&["olivia", "bob", "rita"]),
        admins: set(&[]),
        intake: set(&["bpm"]),
        approvals_required: required,
        request_ttl: Duration::from_secs(3600),
        release_window: Duration::from_secs(900),
        codes_per_request: codes,
        pin_length: 6,
        pin_max_attempts: 3,
        delivery: Delivery::Operator,
    }
}

#[derive(Debug, Clone)]
enum Action {
    Approve(usize),
    Deny(usize),
    Cancel(usize),
    VerifyRight(usize),
    VerifyWrong(usize),
    Resend(usize),
    Release(usize),
    Advance(u64),
}

fn action() -> impl Strategy<Value = Action> {
    let who = 0..PEOPLE.len();
    prop_oneof![
        3 => who.clone().prop_map(Action::Approve),
        1 => who.clone().prop_map(Action::Deny),
        1 => who.clone().prop_map(Action::Cancel),
        3 => who.clone().prop_map(Action::VerifyRight),
        2 => who.clone().prop_map(Action::VerifyWrong),
        1 => who.clone().prop_map(Action::Resend),
        3 => who.prop_map(Action::Release),
        1 => prop_oneof![Just(60u64), Just(1000), Just(4000)].prop_map(Action::Advance),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ok,
    Denied,
    Precondition,
    Invalid,
}

fn kind_of<T>(r: &Result<T, BrokerError>) -> Kind {
    match r {
        Ok(_) => Kind::Ok,
        Err(BrokerError::PermissionDenied(_)) => Kind::Denied,
        Err(BrokerError::FailedPrecondition(_)) => Kind::Precondition,
        Err(BrokerError::InvalidArgument(_)) => Kind::Invalid,
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// The reference model.
#[derive(Debug, Clone)]
struct Model {
    state: State,
    requester: SpiffeId,
    filed_by: SpiffeId,
    approvals: Vec<SpiffeId>,
    operator: Option<SpiffeId>,
    attempts: u32,
    resends: u32,
    codes: u32,
    expires: u64,
}

fn is_final(s: State) -> bool {
    !matches!(s, State::Pending | State::Approved | State::Verified)
}

impl Model {
    fn step(&mut self, a: &AccountPolicy, action: &Action, now: u64) -> Kind {
        if let Action::Advance(_) = action {
            return Kind::Ok;
        }
        if !is_final(self.state) && now >= self.expires {
            self.state = State::Expired;
            return Kind::Precondition;
        }
        let on_request = |c: &SpiffeId, m: &Model| c == &m.requester || c == &m.filed_by;
        match action {
            Action::Approve(w) => {
                let c = id(PEOPLE[*w]);
                if !a.approvers.contains(&c)
                    || on_request(&c, self)
                    || self.approvals.contains(&c)
                    || self.operator.as_ref() == Some(&c)
                {
                    return Kind::Denied;
                }
                if self.state != State::Pending {
                    return Kind::Precondition;
                }
                self.approvals.push(c);
                if self.approvals.len() as u32 >= a.approvals_required {
                    self.state = State::Approved;
                    self.expires = now + 900_000;
                }
                Kind::Ok
            }
            Action::Deny(w) => {
                let c = id(PEOPLE[*w]);
                if !a.approvers.contains(&c) || c == self.requester {
                    return Kind::Denied;
                }
                if !matches!(self.state, State::Pending | State::Approved) {
                    return Kind::Precondition;
                }
                self.state = State::Denied;
                Kind::Ok
            }
            Action::Cancel(w) => {
                let c = id(PEOPLE[*w]);
                if !on_request(&c, self) {
                    return Kind::Denied;
                }
                if !matches!(self.state, State::Pending | State::Approved) {
                    return Kind::Precondition;
                }
                self.state = State::Cancelled;
                Kind::Ok
            }
            Action::VerifyRight(w) | Action::VerifyWrong(w) => {
                let c = id(PEOPLE[*w]);
                if !a.operators.contains(&c) || on_request(&c, self) || self.approvals.contains(&c)
                {
                    return Kind::Denied;
                }
                if self.state != State::Approved {
                    return Kind::Precondition;
                }
                if matches!(action, Action::VerifyRight(_)) {
                    self.state = State::Verified;
                    self.operator = Some(c);
                    return Kind::Ok;
                }
                self.attempts += 1;
                if self.attempts >= a.pin_max_attempts {
                    self.state = State::Locked;
                    Kind::Precondition
                } else {
                    Kind::Invalid
                }
            }
            Action::Resend(w) => {
                let c = id(PEOPLE[*w]);
                if c != self.requester {
                    return Kind::Denied;
                }
                if self.state != State::Approved || self.resends >= MAX_PIN_RESENDS {
                    return Kind::Precondition;
                }
                self.resends += 1;
                Kind::Ok
            }
            Action::Release(w) => {
                let c = id(PEOPLE[*w]);
                if !a.operators.contains(&c)
                    || (self.state == State::Verified && self.operator.as_ref() != Some(&c))
                {
                    return Kind::Denied;
                }
                if self.state != State::Verified || self.codes >= a.codes_per_request {
                    return Kind::Precondition;
                }
                self.codes += 1;
                if self.codes == a.codes_per_request {
                    self.state = State::Released;
                }
                Kind::Ok
            }
            Action::Advance(_) => unreachable!(),
        }
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_actions_follow_the_rules(
        required in 1u32..=2,
        codes in 1u32..=2,
        requester in prop_oneof![Just("alice"), Just("rita")],
        via_intake in any::<bool>(),
        actions in proptest::collection::vec(action(), 1..40),
    ) {
        let a = account(required, codes);
        let key = PinKey::new(SecretKey::from_bytes([9; 32]));
        let mut now = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let (caller, on_behalf) = if via_intake {
            (id("bpm"), Some(id(requester)))
        } else {
            (id(requester), None)
        };
        let (mut rec, _) = RequestRecord::create("r1".into(), &a, &caller, on_behalf, "why", "", now).unwrap();
        let mut model = Model {
            state: State::Pending,
            requester: id(requester),
            filed_by: caller.clone(),
            approvals: vec![],
            operator: None,
            attempts: 0,
            resends: 0,
            codes: 0,
            expires: millis(now) + 3_600_000,
        };
        let mut pin: Option<Pin> = None;
        for action in &actions {
            if let Action::Advance(secs) = action {
                now += Duration::from_secs(*secs);
                continue;
            }
            let before = rec.state;
            let expected = model.step(&a, action, millis(now));
            let mut new_pin = None;
            let result: Result<(), BrokerError> = match rec.expire_if_due(now) {
                Some(e) => Err(e.fail.unwrap()),
                None => match action {
                    Action::Approve(w) => rec.approve(&a, &id(PEOPLE[*w]), "", &key, now).map(|e| new_pin = e.pin),
                    Action::Deny(w) => rec.deny(&a, &id(PEOPLE[*w]), "no", now).map(drop),
                    Action::Cancel(w) => rec.cancel(&id(PEOPLE[*w]), "", now).map(drop),
                    Action::VerifyRight(w) | Action::VerifyWrong(w) => {
                        let right = matches!(action, Action::VerifyRight(_));
                        let typed = match (&pin, right) {
                            (Some(p), true) => p.clone(),
                            // A well-formed wrong PIN: the same length, one digit changed.
                            (Some(p), false) => Pin::from_text(&wrong_pin(p.expose())),
                            (None, _) => Pin::from_text("123456"),
                        };
                        rec.verify_pin(&a, &id(PEOPLE[*w]), &typed, &key, now)
                            .and_then(|e| e.fail.map_or(Ok(()), Err))
                    }
                    Action::Resend(w) => rec.resend_pin(&id(PEOPLE[*w]), &key, now).map(|e| new_pin = e.pin),
                    Action::Release(w) => {
                        let c = id(PEOPLE[*w]);
                        rec.reserve_release(&a, &c, "g", now).map(|_| {
                            rec.finish_release(&c, "g", Ok(1), now);
                        })
                    }
                    Action::Advance(_) => unreachable!(),
                },
            };
            if let Some(p) = new_pin {
                pin = Some(p);
            }
            prop_assert_eq!(kind_of(&result), expected, "{:?} gave {:?}", action, result);
            prop_assert_eq!(rec.state, model.state, "after {:?}", action);
            // Invariants, whatever the model says.
            prop_assert!(before == rec.state || before.can_become(rec.state), "{:?} -> {:?}", before, rec.state);
            let approvers: BTreeSet<_> = rec.approvals.iter().map(|x| x.approver.clone()).collect();
            prop_assert_eq!(approvers.len(), rec.approvals.len(), "an approver counted twice");
            prop_assert!(!approvers.contains(&rec.requester));
            prop_assert!(!approvers.contains(&rec.filed_by), "an intake service approved");
            if let Some(op) = &rec.operator {
                prop_assert!(op != &rec.requester && !approvers.contains(op));
            }
            prop_assert!(rec.codes_released <= rec.codes_allowed);
            prop_assert_eq!(rec.codes_released, model.codes);
            prop_assert_eq!(rec.pin_attempts, model.attempts);
            if matches!(rec.state, State::Approved | State::Verified | State::Released) {
                prop_assert!(rec.approvals.len() as u32 >= rec.approvals_required);
            }
            if rec.state != State::Approved {
                prop_assert!(rec.pin_hash.is_none(), "a PIN hash outlived the APPROVED state");
            }
        }
    }
}

/// The reference rule for filing: who may file, and for whom.
fn model_create(a: &AccountPolicy, caller: &SpiffeId, on_behalf: Option<&SpiffeId>) -> Kind {
    match on_behalf {
        Some(requester) => {
            if !a.intake.contains(caller) {
                Kind::Denied
            } else if requester == caller {
                Kind::Invalid
            } else if !a.requesters.contains(requester) {
                Kind::Denied
            } else {
                Kind::Ok
            }
        }
        None if a.intake.contains(caller) && !a.requesters.contains(caller) => Kind::Invalid,
        None if !a.requesters.contains(caller) => Kind::Denied,
        None => Kind::Ok,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any identity files, for itself or on anyone's behalf: only requesters
    /// file for themselves, only intake services file for someone else, and
    /// that someone must be a requester; the record names who asked and who
    /// filed.
    #[test]
    fn random_identities_file_only_as_the_rules_allow(
        caller in 0..PEOPLE.len(),
        on_behalf in proptest::option::of(0..PEOPLE.len()),
    ) {
        let a = account(1, 1);
        let now = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let caller = id(PEOPLE[caller]);
        let on_behalf = on_behalf.map(|w| id(PEOPLE[w]));
        let expected = model_create(&a, &caller, on_behalf.as_ref());
        let result = RequestRecord::create("r1".into(), &a, &caller, on_behalf.clone(), "why", "", now);
        let kind = kind_of(&result);
        prop_assert_eq!(kind, expected, "{:?} for {:?}: {:?}", caller, on_behalf, result.as_ref().err());
        if let Ok((rec, _)) = result {
            prop_assert_eq!(&rec.filed_by, &caller);
            prop_assert_eq!(rec.requester, on_behalf.unwrap_or(caller));
            prop_assert_eq!(rec.state, State::Pending);
            prop_assert!(rec.approvals.is_empty() && rec.operator.is_none());
        }
    }
}

/// `pin` with its last digit changed: a guess the broker counts.
fn wrong_pin(pin: &str) -> String {
    let (head, last) = pin.split_at(pin.len() - 1);
    let digit = (last.as_bytes()[0] - b'0' + 1) % 10;
    format!("{head}{digit}")
}
