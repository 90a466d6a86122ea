//! The broker's API as plain async functions of (caller, validated input)
//! answering domain values ([`crate::calls`]): what the gRPC layer and the
//! HTTP/JSON front end call, through `convert`. Each state change is stored
//! with its audit events and notifications in one transaction and synced to
//! disk before the answer. With a signed policy in force the people's
//! statements are required and checked as they come ([`crate::consent`]);
//! the policy and admin-action calls are in [`admin`].

pub mod admin;

use std::{
    cmp::Reverse,
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::{Stream, StreamExt, future::ready};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use twokey_consent::{
    StatementRef, VerifiedPolicy,
    statement::{AdminAction, SignedStatement, StatementKind},
};
use twokey_proto::audit::v1::Outcome;
use twokey_runtime::{
    SpiffeId,
    error::{ErrorKind, ServiceError},
    events::EventDraft,
    grant::{GrantFacts, GrantSigner},
    time::Clock,
};

use crate::{
    calls::{
        AccountId, Accounts, Checked, Decision, Enrolled, Enrollment, Identity, NewRequest,
        PinAttempt, Release, Released, Removal, Removed, RequestId, RequestPage, RequestQuery,
        ShownPin, Target, WatchFilter,
    },
    consent::{self, Filing, RequestConsent, SignedPolicy, StoredStatement, refused},
    error::BrokerError,
    notify::{self, NotifyQueue},
    pin::PinKey,
    policy::Delivery,
    policy::{AccountPolicy, Policy, Role},
    refusals::{self, Refusals, Tally},
    rules::Rules,
    state::{Effects, RequestRecord, State, count, lacks_role, millis},
    store::{Claim, RequestStore, Writes},
    vault::{EnrollRequest, GrantPurpose, ReleaseEvidence, RemoveAccountRequest, Vault},
};

/// An input that names one stored request.
trait OnRequest {
    fn request(&self) -> &RequestId;
}

impl OnRequest for RequestId {
    fn request(&self) -> &RequestId {
        self
    }
}

impl OnRequest for Decision {
    fn request(&self) -> &RequestId {
        &self.request
    }
}

impl OnRequest for PinAttempt {
    fn request(&self) -> &RequestId {
        &self.request
    }
}

impl OnRequest for Release {
    fn request(&self) -> &RequestId {
        &self.request
    }
}

/// One change, as watchers see it.
#[derive(Debug, Clone)]
pub struct Change {
    /// The request after the change.
    pub request: Arc<RequestRecord>,
    /// What happened.
    pub action: String,
}

/// Everything the broker runs on.
#[derive(Debug)]
pub struct BrokerParts {
    /// The validated policy file (its roles and counts give way to the
    /// signed policy's once one is in force).
    pub policy: Arc<Policy>,
    /// Request storage.
    pub store: Arc<dyn RequestStore>,
    /// The notification queue.
    pub queue: Arc<NotifyQueue>,
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// The PIN HMAC key.
    pub pin_key: PinKey,
    /// The grant signer.
    pub grants: GrantSigner,
    /// The vault.
    pub vault: Arc<dyn Vault>,
    /// The signed policy as last verified from the vault.
    pub signed: Arc<SignedPolicy>,
}

/// The broker: a cheap handle on what it runs on, so a call whose work
/// must finish even when its caller goes away (a release) runs it on a task
/// of its own.
#[derive(Debug, Clone)]
pub struct Broker(Arc<Core>);

/// What a [`Broker`] runs on, shared by its handles (its methods reach
/// these fields through `Deref`; none is public).
#[derive(Debug)]
pub struct Core {
    rules: Arc<Rules>,
    store: Arc<dyn RequestStore>,
    queue: Arc<NotifyQueue>,
    clock: Arc<dyn Clock>,
    pin_key: PinKey,
    grants: GrantSigner,
    vault: Arc<dyn Vault>,
    signed: Arc<SignedPolicy>,
    changes: broadcast::Sender<Change>,
    closing: tokio::sync::watch::Sender<bool>,
    refusals: Refusals,
    refusal_events: std::sync::OnceLock<tokio::sync::watch::Sender<u64>>,
}

impl std::ops::Deref for Broker {
    type Target = Core;

    fn deref(&self) -> &Core {
        &self.0
    }
}

/// Most bytes of requests in one page: well under the gRPC message limit.
const MAX_PAGE_BYTES: usize = twokey_runtime::serve::MAX_MESSAGE_BYTES / 4 * 3;

/// An `on_behalf_of` the policy does not name.
fn not_an_identity(name: &str) -> BrokerError {
    BrokerError::invalid(format!(
        "on_behalf_of {:?} is not an identity in the policy; give a policy name or SPIFFE ID",
        name.chars().take(120).collect::<String>()
    ))
}

/// What an admin's grant (enrollment or removal) says: the account and the
/// admin as its operator, no request and no other people.
fn admin_grant(purpose: GrantPurpose, account_id: &str, admin: &SpiffeId) -> GrantFacts {
    GrantFacts {
        purpose,
        request_id: String::new(),
        account_id: account_id.to_owned(),
        requester: String::new(),
        approvers: Vec::new(),
        operator: admin.to_string(),
    }
}

/// An account to enroll that the policy does not name.
fn not_enrollable(policy: &Policy, account_id: &str) -> BrokerError {
    match policy.signed_version() {
        None => BrokerError::NotFound(format!(
            "account {account_id:?} is not in the policy; add [accounts.{account_id}] to the policy and restart the broker first"
        )),
        Some(v) => BrokerError::NotFound(format!(
            "account {account_id:?} is not in signed policy version {v}; admins add [accounts.{account_id}] to it with `twokey policy propose/sign/apply` first (see `twokey policy show`)"
        )),
    }
}

/// An account the rules in force do not name.
pub(crate) fn unknown_account(policy: &Policy, id: &str) -> BrokerError {
    BrokerError::NotFound(format!(
        "unknown account {:?}; {} names: {}",
        id.chars().take(70).collect::<String>(),
        policy.source(),
        policy.describe_accounts()
    ))
}

fn not_found(id: &str) -> BrokerError {
    BrokerError::NotFound(format!(
        "no request {id}; list requests with `twokey request list`"
    ))
}

/// A request statement missing while a signed policy is in force.
fn missing_request_statement(caller: &SpiffeId, version: u64) -> BrokerError {
    refused(
        ErrorKind::FailedPrecondition,
        format!(
            "signed policy version {version} is in force: filing a request needs your request statement, signed by you ({caller}) with your SSH key, binding a request id you choose, the account, the requester, the reason and ticket and the time; file with `twokey request create`, which signs it"
        ),
    )
}

/// Refuses statements for a request that cannot carry them under the
/// signed policy in force: one filed before it, or under another version.
fn consent_in_force<'r>(
    policy: Option<&VerifiedPolicy>,
    r: &'r RequestRecord,
) -> Result<Option<&'r RequestConsent>, BrokerError> {
    let Some(policy) = policy else {
        return Ok(r.consent.as_ref());
    };
    let active = policy.version();
    match &r.consent {
        None => Err(refused(
            ErrorKind::FailedPrecondition,
            format!(
                "request {} was filed before a signed policy was in force, so it has no signed request statement; version {active} is in force now: file it again with `twokey request create`",
                r.id
            ),
        )),
        Some(c) if c.policy_version != active => Err(refused(
            ErrorKind::FailedPrecondition,
            format!(
                "request {} was filed under policy version {}, version {active} is in force now and its statements no longer count: file it again with `twokey request create`",
                r.id, c.policy_version
            ),
        )),
        Some(c) => Ok(Some(c)),
    }
}

/// The caller's approval statement for `r`, checked: required with a signed
/// policy in force; bound to the stored request statement.
fn approval_statement(
    policy: Option<&VerifiedPolicy>,
    given: Option<&SignedStatement>,
    r: &RequestRecord,
    caller: &SpiffeId,
    now: SystemTime,
) -> Result<Option<StoredStatement>, BrokerError> {
    let Some(c) = consent_in_force(policy, r)? else {
        // No signed policy and no request statement: nothing to bind to.
        return Ok(None);
    };
    let Some(given) = given else {
        return match policy {
            Some(p) => Err(refused(
                ErrorKind::FailedPrecondition,
                format!(
                    "signed policy version {} is in force: approving request {} needs your approval statement, signed by you ({caller}) with your SSH key and bound to the request statement the request shows; approve with `twokey request approve {}`, which signs it",
                    p.version(),
                    r.id,
                    r.id
                ),
            )),
            None => Ok(None),
        };
    };
    let at = StatementRef::Approval(c.approvals.len());
    let opened = consent::open(policy, at, given, StatementKind::Approval, now)?;
    consent::signed_by(&opened, at, caller)?;
    consent::check_approval(&opened, at, &c.request, &r.id, &r.account_id)?;
    Ok(Some(given.into()))
}

/// The operator's release statements handed in with the PIN (delivery =
/// "requester"), checked: required with a signed policy in force, at most
/// the codes the request has left, each bound to the request and its
/// approvals with its own grant and release ids.
fn pin_releases(
    policy: Option<&VerifiedPolicy>,
    given: &[SignedStatement],
    r: &RequestRecord,
    caller: &SpiffeId,
    now: SystemTime,
) -> Result<Vec<StoredStatement>, BrokerError> {
    if r.delivery != Delivery::Requester {
        return Ok(Vec::new());
    }
    let Some(c) = consent_in_force(policy, r)? else {
        return Ok(Vec::new());
    };
    let left = r.codes_allowed.saturating_sub(r.codes_released) as usize;
    if given.is_empty() {
        return match policy {
            Some(p) => Err(refused(
                ErrorKind::FailedPrecondition,
                format!(
                    "signed policy version {} is in force and account {} delivers codes to the requester: verifying the PIN needs your release statements ({}, one per code the requester may release), signed by you ({caller}); verify with `twokey pin verify {}`, which signs them",
                    p.version(),
                    r.account_id,
                    if left == 1 {
                        "one".to_owned()
                    } else {
                        format!("1 to {left}")
                    },
                    r.id
                ),
            )),
            None => Ok(Vec::new()),
        };
    }
    if given.len() > left {
        return Err(BrokerError::invalid(format!(
            "{} for request {}, which may release {} more",
            count(
                given.len() as u64,
                "release statement",
                "release statements"
            ),
            r.id,
            count(left as u64, "code", "codes")
        )));
    }
    let mut ids = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(given.len());
    for s in given {
        let at = StatementRef::Release;
        let opened = consent::open(policy, at, s, StatementKind::Release, now)?;
        consent::signed_by(&opened, at, caller)?;
        let lb = consent::check_release(&opened, c, &r.id, &r.account_id)?;
        if !ids.insert(lb.grant_id.clone()) || !ids.insert(lb.release_id.clone()) {
            return Err(BrokerError::invalid(
                "two release statements share a grant or release id; each needs ids of its own",
            ));
        }
        out.push(StoredStatement::from(s));
    }
    Ok(out)
}

/// The release statement of one release, checked, with its binding: the
/// operator's own (required with a signed policy in force and delivery to
/// the operator), or for delivery = "requester" the next one the operator
/// signed at VerifyPin. Takes that one from the stored request.
fn release_statement(
    policy: Option<&VerifiedPolicy>,
    given: Option<&SignedStatement>,
    r: &mut RequestRecord,
    caller: &SpiffeId,
    now: SystemTime,
) -> Result<Option<(StoredStatement, twokey_consent::statement::ReleaseBinding)>, BrokerError> {
    let Some(c) = consent_in_force(policy, r)? else {
        return Ok(None);
    };
    let operator = match r.delivery {
        Delivery::Operator => caller.clone(),
        Delivery::Requester => r.operator.clone().unwrap_or_else(|| caller.clone()),
    };
    if let Some(given) = given {
        let at = StatementRef::Release;
        let opened = consent::open(policy, at, given, StatementKind::Release, now)?;
        consent::signed_by(&opened, at, &operator)?;
        let lb = consent::check_release(&opened, c, &r.id, &r.account_id)?;
        return Ok(Some((given.into(), lb)));
    }
    if r.delivery == Delivery::Requester
        && let Some(c) = r.consent.as_mut()
        && !c.releases.is_empty()
    {
        let stored = c.releases.remove(0);
        let lb = consent::release_of(&stored).ok_or_else(|| {
            BrokerError::Store(format!(
                "a stored release statement of request {} does not decode",
                r.id
            ))
        })?;
        return Ok(Some((stored, lb)));
    }
    match policy {
        Some(p) if r.delivery == Delivery::Requester => Err(refused(
            ErrorKind::FailedPrecondition,
            format!(
                "signed policy version {} is in force and request {} has no release statement left: the operator signs them when verifying the PIN; file a new request for more codes",
                p.version(),
                r.id
            ),
        )),
        Some(p) => Err(refused(
            ErrorKind::FailedPrecondition,
            format!(
                "signed policy version {} is in force: releasing a code of request {} needs your release statement, signed by you ({caller}), binding the request, exactly its approvals, a grant id and a release id; release with `twokey code release {}`, which signs it",
                p.version(),
                r.id,
                r.id
            ),
        )),
        None => Ok(None),
    }
}

impl Broker {
    /// A broker over `parts`.
    pub fn new(parts: BrokerParts) -> Self {
        let (changes, _) = broadcast::channel(1024);
        Self(Arc::new(Core {
            rules: Arc::new(Rules::new(parts.policy, parts.signed.clone())),
            store: parts.store,
            queue: parts.queue,
            clock: parts.clock,
            pin_key: parts.pin_key,
            grants: parts.grants,
            vault: parts.vault,
            signed: parts.signed,
            changes,
            closing: tokio::sync::watch::Sender::new(false),
            refusals: Refusals::default(),
            refusal_events: std::sync::OnceLock::new(),
        }))
    }

    /// Counts the `access.denied` events written for refusals of identities
    /// outside the policy, so tests can wait for one.
    #[must_use]
    pub fn with_refusal_counter(self, counter: tokio::sync::watch::Sender<u64>) -> Self {
        // Set once, before the broker serves: a second counter is ignored.
        let _ = self.refusal_events.set(counter);
        self
    }

    /// Ends every open `WatchRequests` stream (on shutdown, so the server
    /// can stop without waiting for watchers to hang up).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// The rules in force: the policy file's, or once a signed policy is
    /// in force the rules made from it.
    pub fn policy(&self) -> Arc<Policy> {
        self.rules.current()
    }

    fn known(&self, caller: &SpiffeId) -> Result<(), BrokerError> {
        if self.policy().name_of(caller).is_some() {
            Ok(())
        } else {
            Err(BrokerError::denied(format!(
                "{caller} is not named in the broker policy; ask an admin to add it"
            )))
        }
    }

    fn account<'p>(policy: &'p Policy, id: &AccountId) -> Result<&'p AccountPolicy, BrokerError> {
        let id = id.as_str();
        policy
            .account(id)
            .ok_or_else(|| unknown_account(policy, id))
    }

    /// Applies `rule` to a stored request (after expiring it if its time ran
    /// out), stores the change with its events and notifications, syncs,
    /// tells watchers, and returns the request or the rule's error.
    /// `request_id` is a checked [`RequestId`] or a stored request's id.
    async fn act(
        &self,
        request_id: &str,
        check_expiry: bool,
        mut rule: impl FnMut(
            &mut RequestRecord,
            &AccountPolicy,
            SystemTime,
        ) -> Result<Effects, BrokerError>
        + Send,
    ) -> Result<RequestRecord, BrokerError> {
        let now = self.clock.now();
        let policy = self.policy();
        let mut outcome: Option<(String, Option<BrokerError>)> = None;
        let record = self
            .store
            .update(request_id, &mut |record| {
                outcome = None;
                // A request whose time ran out expires even if its account
                // left the rules meanwhile (a new signed version).
                let effects = match check_expiry.then(|| record.expire_if_due(now)).flatten() {
                    Some(expired) => expired,
                    None => {
                        let account = policy.account(&record.account_id).ok_or_else(|| {
                            BrokerError::precondition(format!(
                                "account {} of request {} is no longer in {}",
                                record.account_id,
                                record.id,
                                policy.source()
                            ))
                        })?;
                        rule(record, account, now)?
                    }
                };
                let messages = notify::messages_for(
                    &policy,
                    record,
                    &effects.action,
                    effects.pin.as_ref(),
                    millis(now),
                );
                let mut events = effects.events;
                if let Some(pin_message) = messages.iter().find(|m| m.pin.is_some())
                    && !self.queue.deliverable(pin_message)
                {
                    events.push(
                        EventDraft::new("broker", "notification.failed")
                            .account(&record.account_id)
                            .request(&record.id)
                            .outcome(Outcome::Failure)
                            .attr("kind", "pin")
                            .attr("to", record.requester.to_string())
                            .attr("error", "no notifier can reach the requester"),
                    );
                }
                let action = effects.action.clone();
                outcome = Some((effects.action, effects.fail));
                Ok(Writes {
                    events,
                    messages,
                    claims: effects.claims,
                    action,
                })
            })
            .await?
            .ok_or_else(|| not_found(request_id))?;
        self.store.commit().await?;
        let (action, fail) = outcome.unwrap_or_default();
        tracing::info!(request_id, action = %action, state = record.state.as_str(), "request changed");
        let _ = self.changes.send(Change {
            request: Arc::new(record.clone()),
            action,
        });
        match fail {
            Some(e) => Err(e),
            None => Ok(record),
        }
    }

    /// The caller's identity, policy name, groups and roles.
    pub async fn who_am_i(&self, caller: &SpiffeId) -> Result<Identity, BrokerError> {
        let policy = self.policy();
        Ok(Identity {
            id: caller.clone(),
            name: policy.name_of(caller).unwrap_or_default().to_owned(),
            accounts: policy
                .accounts()
                .filter_map(|a| {
                    let roles = a.roles_of(caller);
                    (!roles.is_empty()).then(|| (a.id.clone(), roles))
                })
                .collect(),
            groups: policy.groups_of(caller),
            policy_version: self.signed.version(),
        })
    }

    /// Files a request (requester, or intake on a requester's behalf).
    pub async fn create_request(
        &self,
        caller: &SpiffeId,
        call: Checked<NewRequest>,
    ) -> Result<RequestRecord, BrokerError> {
        self.authorised(caller, "create_request", &call.target, async {
            let req = call.input?;
            let now = self.clock.now();
            // The rules of filing first (roles, texts), then the statement;
            // unless the statement names a signed version newer than the
            // broker's, whose rules decide once it is fetched.
            let filing = || -> Result<(), BrokerError> {
                let rules = self.policy();
                let account = Self::account(&rules, &req.account)?;
                let on_behalf_of = match &req.on_behalf_of {
                    None => None,
                    Some(name) => Some(rules.resolve(name).ok_or_else(|| not_an_identity(name))?),
                };
                RequestRecord::create(
                    String::new(),
                    account,
                    caller,
                    on_behalf_of,
                    &req.reason,
                    &req.ticket,
                    now,
                )
                .map(drop)
            };
            let names_newer = req
                .statement
                .as_ref()
                .and_then(consent::named_version)
                .is_some_and(|v| self.signed.root().is_some() && v > self.signed.version());
            if let Err(e) = filing()
                && !names_newer
            {
                return Err(e);
            }
            let policy = self.policy_for(req.statement.iter()).await;
            // The statement may have brought in a newer signed version: its
            // rules decide.
            let rules = self.policy();
            let account = Self::account(&rules, &req.account)?;
            let on_behalf_of = match &req.on_behalf_of {
                None => None,
                Some(name) => Some(
                    rules
                        .resolve(name)
                        .ok_or_else(|| not_an_identity(name))?,
                ),
            };
            let signed = match (&req.statement, &policy) {
                (None, Some(p)) => return Err(missing_request_statement(caller, p.version())),
                (None, None) => None,
                (Some(given), policy) => {
                    let at = StatementRef::Request;
                    let opened =
                        consent::open(policy.as_deref(), at, given, StatementKind::Request, now)?;
                    consent::signed_by(&opened, at, caller)?;
                    let rb = consent::check_request(
                        &opened,
                        Filing {
                            account: &account.id,
                            requester: on_behalf_of.as_ref().unwrap_or(caller),
                            reason: &req.reason,
                            ticket: &req.ticket,
                            now,
                        },
                    )?;
                    if self.store.get(&rb.request_id).await?.is_some() {
                        return Err(refused(
                            ErrorKind::PermissionDenied,
                            format!(
                                "request id {} is taken: a request statement files one request; sign a new one (`twokey request create` chooses a new id)",
                                rb.request_id
                            ),
                        ));
                    }
                    let created = consent::created_at(&rb).unwrap_or(now);
                    Some((rb.request_id, created, opened, StoredStatement::from(given)))
                }
            };
            let id = signed
                .as_ref()
                .map_or_else(|| uuid::Uuid::new_v4().to_string(), |s| s.0.clone());
            let (mut record, mut effects) = RequestRecord::create(
                id,
                account,
                caller,
                on_behalf_of,
                &req.reason,
                &req.ticket,
                now,
            )?;
            if let Some((_, created, opened, stored)) = signed {
                record.created_ms = millis(created);
                let event = &mut effects.events[0].attributes;
                event.insert(
                    "policy_version".into(),
                    opened.statement.policy_version.to_string(),
                );
                event.insert("statement".into(), hex::encode(opened.digest));
                event.insert("signed_by".into(), opened.signer);
                record.consent = Some(RequestConsent {
                    policy_version: opened.statement.policy_version,
                    request: stored,
                    approvals: Vec::new(),
                    releases: Vec::new(),
                    used_release_ids: Vec::new(),
                });
            }
            let messages =
                notify::messages_for(&rules, &record, &effects.action, None, millis(now));
            self.store.create(
                &record,
                &Writes {
                    events: effects.events,
                    messages,
                    claims: Vec::new(),
                    action: effects.action.clone(),
                },
            )
            .await?;
            self.store.commit().await?;
            tracing::info!(
                request_id = %record.id,
                account_id = %record.account_id,
                "request created"
            );
            let _ = self.changes.send(Change {
                request: Arc::new(record.clone()),
                action: effects.action,
            });
            Ok(record)
        })
        .await
    }

    async fn load_visible(
        &self,
        caller: &SpiffeId,
        id: &str,
    ) -> Result<RequestRecord, BrokerError> {
        let record = self.store.get(id).await?.ok_or_else(|| not_found(id))?;
        if !record.visible_to(self.policy().account(&record.account_id), caller) {
            return Err(BrokerError::denied(format!(
                "{caller} may not see request {id}; only the people on it and the account's approvers, operators and admins may"
            )));
        }
        Ok(record)
    }

    /// One request the caller may see; expires it first if its time ran out.
    pub async fn get_request(
        &self,
        caller: &SpiffeId,
        call: Checked<RequestId>,
    ) -> Result<RequestRecord, BrokerError> {
        self.known(caller)?;
        let id = call.input?;
        let id = id.as_str();
        let mut record = self.load_visible(caller, id).await?;
        if record.is_due(self.clock.now()) {
            match self.act(id, true, |_, _, _| Ok(Effects::default())).await {
                Ok(r) => record = r,
                Err(BrokerError::FailedPrecondition(_)) => {
                    record = self.load_visible(caller, id).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(record)
    }

    /// Requests the caller may see, newest first, a page at a time. Requests
    /// whose time ran out show as EXPIRED even before the sweeper stores it.
    pub async fn list_requests(
        &self,
        caller: &SpiffeId,
        call: Checked<RequestQuery>,
    ) -> Result<RequestPage, BrokerError> {
        self.known(caller)?;
        let req = call.input?;
        let policy = self.policy();
        if let Some(account) = &req.account {
            Self::account(&policy, account)?;
        }
        let account_filter = req.account.as_ref().map(AccountId::as_str);
        let after = if req.page_token.is_empty() {
            None
        } else {
            let (ms, id) = req
                .page_token
                .split_once(':')
                .and_then(|(ms, id)| Some((ms.parse::<u64>().ok()?, id.to_owned())))
                .ok_or_else(|| {
                    BrokerError::invalid(
                        "page_token is malformed; pass next_page_token from the previous response",
                    )
                })?;
            Some((Reverse(ms), id))
        };
        let now = self.clock.now();
        let mut records: Vec<RequestRecord> = self
            .store
            .all()
            .await?
            .into_iter()
            .filter(|r| r.visible_to(policy.account(&r.account_id), caller))
            .filter(|r| !req.mine || &r.requester == caller || &r.filed_by == caller)
            .filter(|r| account_filter.is_none_or(|a| r.account_id == a))
            .map(|mut r| {
                r.expire_if_due(now);
                r
            })
            .filter(|r| req.state.is_none_or(|s| r.state == s))
            .collect();
        records.sort_by(|a, b| (Reverse(a.created_ms), &a.id).cmp(&(Reverse(b.created_ms), &b.id)));
        let start = after.map_or(0, |key| {
            records.partition_point(|r| (Reverse(r.created_ms), r.id.clone()) <= key)
        });
        // A page also ends before it outgrows the message limit (long
        // reasons and histories): the rest comes with next_page_token.
        let mut requests = Vec::new();
        let mut bytes = 0usize;
        let mut last = None;
        for record in records.iter().skip(start).take(req.page_size) {
            bytes += (req.size_of)(record) + 8;
            if !requests.is_empty() && bytes > MAX_PAGE_BYTES {
                break;
            }
            requests.push(record.clone());
            last = Some(record);
        }
        let next_page_token = match last {
            Some(r) if start + requests.len() < records.len() => {
                format!("{}:{}", r.created_ms, r.id)
            }
            _ => String::new(),
        };
        Ok(RequestPage {
            requests,
            next_page_token,
        })
    }

    /// Tells this replica's watchers of a change another replica made.
    pub fn publish_change(&self, change: Change) {
        let _ = self.changes.send(change);
    }

    /// A stream of changes the caller may see, optionally for one account.
    pub fn watch_requests(
        &self,
        caller: &SpiffeId,
        call: Checked<WatchFilter>,
    ) -> Result<impl Stream<Item = Change> + Send + 'static, BrokerError> {
        self.known(caller)?;
        let WatchFilter { account } = call.input?;
        if let Some(account) = &account {
            Self::account(&self.policy(), account)?;
        }
        // The rules in force at each change, not at the start of the watch.
        let rules = self.rules.clone();
        let caller = caller.clone();
        let mut closing = self.closing.subscribe();
        let closed = async move {
            let _ = closing.wait_for(|c| *c).await;
        };
        Ok(BroadcastStream::new(self.changes.subscribe())
            .take_until(closed)
            .filter_map(move |item| {
                let out = match item {
                    Ok(change)
                        if account
                            .as_ref()
                            .is_none_or(|a| change.request.account_id == a.as_str())
                            && change.request.visible_to(
                                rules.current().account(&change.request.account_id),
                                &caller,
                            ) =>
                    {
                        Some(change)
                    }
                    Ok(_) => None,
                    Err(lagged) => {
                        tracing::warn!("a watcher fell behind: {lagged}");
                        None
                    }
                };
                ready(out)
            }))
    }

    /// An audited change of the request `call` names: once the caller is
    /// known and the input valid, `rule` applied through [`Self::act`].
    async fn change<T: OnRequest + Sync>(
        &self,
        caller: &SpiffeId,
        attempted: &str,
        call: Checked<T>,
        mut rule: impl FnMut(
            &T,
            &mut RequestRecord,
            &AccountPolicy,
            SystemTime,
        ) -> Result<Effects, BrokerError>
        + Send,
    ) -> Result<RequestRecord, BrokerError> {
        self.authorised(caller, attempted, &call.target, async {
            let input = call.input?;
            self.act(input.request().as_str(), true, |r, a, now| {
                rule(&input, r, a, now)
            })
            .await
        })
        .await
    }

    /// An approver approves; with a signed policy in force their approval
    /// statement, bound to the request statement, is required and stored
    /// with the request in the order approvals came.
    pub async fn approve_request(
        &self,
        caller: &SpiffeId,
        call: Checked<Decision>,
    ) -> Result<RequestRecord, BrokerError> {
        let key = &self.pin_key;
        // Only a known caller's statement may make the broker ask the vault.
        let policy = match (&call.input, self.known(caller)) {
            (Ok(d), Ok(())) => self.policy_for(d.statement.iter()).await,
            _ => self.signed.active(),
        };
        self.change(caller, "approve", call, |d, r, a, now| {
            let effects = r.approve(a, caller, &d.note, key, now)?;
            if let Some(stored) =
                approval_statement(policy.as_deref(), d.statement.as_ref(), r, caller, now)?
                && let Some(c) = r.consent.as_mut()
            {
                c.approvals.push(stored);
            }
            Ok(effects)
        })
        .await
    }

    /// An approver denies.
    pub async fn deny_request(
        &self,
        caller: &SpiffeId,
        call: Checked<Decision>,
    ) -> Result<RequestRecord, BrokerError> {
        self.change(caller, "deny", call, |d, r, a, now| {
            r.deny(a, caller, &d.note, now)
        })
        .await
    }

    /// The requester cancels.
    pub async fn cancel_request(
        &self,
        caller: &SpiffeId,
        call: Checked<Decision>,
    ) -> Result<RequestRecord, BrokerError> {
        self.change(caller, "cancel", call, |d, r, _, now| {
            r.cancel(caller, &d.note, now)
        })
        .await
    }

    /// The operator checks the PIN. With delivery = "requester" and a
    /// signed policy in force, the operator's release statements for the
    /// requester's own releases come with it and are kept once the PIN is
    /// right.
    pub async fn verify_pin(
        &self,
        caller: &SpiffeId,
        call: Checked<PinAttempt>,
    ) -> Result<RequestRecord, BrokerError> {
        let key = &self.pin_key;
        let policy = match (&call.input, self.known(caller)) {
            (Ok(p), Ok(())) => self.policy_for(p.releases.iter()).await,
            _ => self.signed.active(),
        };
        self.change(caller, "verify_pin", call, |p, r, a, now| {
            if r.delivery != Delivery::Requester && !p.releases.is_empty() {
                return Err(BrokerError::invalid(format!(
                    "account {} delivers codes to the operator: sign the release statement when you release the code (`twokey code release {}`), not with the PIN",
                    r.account_id, r.id
                )));
            }
            let effects = r.verify_pin(a, caller, &p.pin, key, now)?;
            if r.state == State::Verified && effects.fail.is_none() {
                let releases = pin_releases(policy.as_deref(), &p.releases, r, caller, now)?;
                if let Some(c) = r.consent.as_mut() {
                    c.releases = releases;
                }
            }
            Ok(effects)
        })
        .await
    }

    /// The requester asks for a new PIN.
    pub async fn resend_pin(
        &self,
        caller: &SpiffeId,
        call: Checked<RequestId>,
    ) -> Result<RequestRecord, BrokerError> {
        let key = &self.pin_key;
        self.change(caller, "resend_pin", call, |_, r, _, now| {
            r.resend_pin(caller, key, now)
        })
        .await
    }

    /// Shows the live PIN to the request's requester, and to no one else
    /// (refusals audited as `access.denied`). A request whose time ran out
    /// is expired first. Each view is recorded (`pin.viewed`, synced) before
    /// the PIN leaves; the request itself does not change.
    pub async fn show_pin(
        &self,
        caller: &SpiffeId,
        call: Checked<RequestId>,
    ) -> Result<ShownPin, BrokerError> {
        self.authorised(caller, "show_pin", &call.target, async {
            let id = call.input?;
            let id = id.as_str();
            let now = self.clock.now();
            let mut record = self.store.get(id).await?.ok_or_else(|| not_found(id))?;
            if &record.requester == caller && record.is_due(now) {
                match self.act(id, true, |_, _, _| Ok(Effects::default())).await {
                    Ok(r) => record = r,
                    Err(BrokerError::FailedPrecondition(_)) => {
                        record = self.store.get(id).await?.ok_or_else(|| not_found(id))?;
                    }
                    Err(e) => return Err(e),
                }
            }
            let pin = record.live_pin(caller, &self.pin_key, now)?;
            let event = EventDraft::new(caller.to_string(), "pin.viewed")
                .account(&record.account_id)
                .request(&record.id)
                .attr("state", record.state.as_str());
            self.emit(event).await?;
            tracing::info!(request_id = %record.id, "PIN shown to its requester");
            Ok(ShownPin {
                pin,
                expires_ms: record.expires_ms,
                request: record,
            })
        })
        .await
    }

    /// Releases one code: reserves it from the quota (stored), signs a
    /// single-use grant, asks the vault, and records the outcome. With the
    /// people's statements the grant carries the id the operator's release
    /// statement names and the vault gets the evidence: the request
    /// statement, exactly the stored approvals and the release.
    ///
    /// The work runs on a task of its own that this call awaits: a caller
    /// that hangs up or runs out of time does not cancel it half-way, so a
    /// reserved code is always followed by the vault call and its recorded
    /// outcome (the quota given back only when the vault surely released
    /// nothing).
    pub async fn release_code(
        &self,
        caller: &SpiffeId,
        call: Checked<Release>,
    ) -> Result<Released, BrokerError> {
        let broker = self.clone();
        let caller = caller.clone();
        let work = twokey_runtime::trace::spawn_in_call(async move {
            broker.release_to_completion(&caller, call).await
        });
        match work.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(BrokerError::Store(
                "the broker is stopping and the release did not finish; see the request's history (`twokey request show`) and try again once the broker is back".into(),
            )),
        }
    }

    /// [`Self::release_code`]'s work, from the caller check to the recorded
    /// outcome.
    async fn release_to_completion(
        &self,
        caller: &SpiffeId,
        call: Checked<Release>,
    ) -> Result<Released, BrokerError> {
        self.authorised(caller, "release_code", &call.target, async {
            let input = call.input?;
            let policy = self.policy_for(input.statement.iter()).await;
            let request = &input.request;
            let mut grant_id = String::new();
            let mut evidence: Option<ReleaseEvidence> = None;
            let reserved = self
                .act(request.as_str(), true, |r, a, now| {
                    // The rules of releasing first (roles, state, quota).
                    r.clone().reserve_release(a, caller, "", now)?;
                    let release = release_statement(
                        policy.as_deref(),
                        input.statement.as_ref(),
                        r,
                        caller,
                        now,
                    )?;
                    let mut claims = Vec::new();
                    (grant_id, evidence) = match (release, r.consent.as_mut()) {
                        (Some((stored, binding)), Some(c)) => {
                            c.used_release_ids.push(binding.release_id.clone());
                            claims = vec![
                                Claim {
                                    key: format!("grant:{}", binding.grant_id),
                                    taken: format!(
                                        "grant id {} was used already; the operator must sign a new release statement with a new grant id (`twokey code release {}`)",
                                        binding.grant_id, r.id
                                    ),
                                },
                                Claim {
                                    key: format!("release:{}", binding.release_id),
                                    taken: format!(
                                        "release {} was used already; the operator must sign a new release statement (`twokey code release {}`)",
                                        binding.release_id, r.id
                                    ),
                                },
                            ];
                            let evidence = ReleaseEvidence {
                                request: Some((&c.request).into()),
                                approvals: c.approvals.iter().map(Into::into).collect(),
                                release: Some((&stored).into()),
                            };
                            (binding.grant_id, Some(evidence))
                        }
                        _ => (GrantSigner::new_grant_id(), None),
                    };
                    let mut effects = r.reserve_release(a, caller, &grant_id, now)?;
                    effects.claims = claims;
                    Ok(effects)
                })
                .await?;
            let facts = GrantFacts {
                purpose: GrantPurpose::Release,
                request_id: reserved.id.clone(),
                account_id: reserved.account_id.clone(),
                requester: reserved.requester.to_string(),
                approvers: reserved
                    .approvals
                    .iter()
                    .map(|a| a.approver.to_string())
                    .collect(),
                operator: reserved
                    .operator
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            };
            let (_, signed) = self.grants.sign(grant_id.clone(), facts, self.clock.now());
            let answer = self.vault.generate_code(signed, evidence).await;
            let outcome = match &answer {
                Ok(code) => Ok(code.step),
                Err(e) => Err((e.message.as_str(), e.surely_refused())),
            };
            let record = self
                .act(request.as_str(), false, |r, _, now| {
                    Ok(r.finish_release(caller, &grant_id, outcome, now))
                })
                .await?;
            let code = answer?;
            Ok(Released {
                code,
                request: record,
            })
        })
        .await
    }

    /// The signed policy in force, after fetching it again from the vault
    /// if one of `statements` names a version above the cached one.
    async fn policy_for<'a>(
        &self,
        statements: impl Iterator<Item = &'a SignedStatement>,
    ) -> Option<Arc<VerifiedPolicy>> {
        let named = statements.filter_map(consent::named_version).max();
        if self.signed.root().is_some()
            && named.is_some_and(|v| v > self.signed.version())
            && let Err(e) = self.signed.refresh(&*self.vault).await
        {
            tracing::warn!("a statement names a newer policy version; fetching it failed: {e}");
        }
        self.signed.active()
    }

    /// Runs `call` for a caller named in the policy; a refusal (the call's
    /// own PERMISSION_DENIED) is recorded as an `access.denied` event naming
    /// what was `attempted` on `target`, and the result is returned
    /// unchanged. A caller the policy does not name is refused the same way
    /// but only counted ([`refusals`]): its refusals are written as one event
    /// per identity per minute by [`Self::flush_refusals`].
    async fn authorised<T>(
        &self,
        caller: &SpiffeId,
        attempted: &str,
        target: &Target,
        call: impl Future<Output = Result<T, BrokerError>>,
    ) -> Result<T, BrokerError> {
        if let Err(e) = self.known(caller) {
            self.refusals.record(caller, attempted, self.clock.now());
            return Err(e);
        }
        let result = call.await;
        let refusal = match &result {
            Err(BrokerError::PermissionDenied(why)) => Some(("access.denied", why.clone())),
            Err(e @ BrokerError::Consent { .. }) if e.kind() != ErrorKind::Internal => {
                Some(("consent.refused", e.to_string()))
            }
            _ => None,
        };
        if let Some((action, why)) = refusal {
            let (account, request_id) = match target {
                Target::Nothing => (String::new(), ""),
                Target::Account(a) => (a.clone(), ""),
                Target::Request(id) => {
                    let account = self
                        .store
                        .get(id)
                        .await
                        .ok()
                        .flatten()
                        .map(|r| r.account_id);
                    (account.unwrap_or_default(), id.as_str())
                }
            };
            let event = EventDraft::new(caller.to_string(), action)
                .account(account)
                .request(request_id)
                .outcome(Outcome::Denied)
                .attr("attempted", attempted)
                .attr("reason", why.chars().take(300).collect::<String>());
            if let Err(e) = self.emit(event).await {
                tracing::error!("cannot record a refused attempt: {e}");
            }
        }
        result
    }

    async fn emit(&self, event: EventDraft) -> Result<(), BrokerError> {
        self.store.emit(vec![event]).await?;
        self.store.commit().await
    }

    /// Writes the counted refusals of identities outside the policy: the
    /// windows a minute old, or with `all` every one (on shutdown). Returns
    /// how many events were written. Tallies that cannot be written are put
    /// back to be tried again, so no refusal goes uncounted.
    pub async fn flush_refusals(&self, all: bool) -> usize {
        let tallies = if all {
            self.refusals.take_all()
        } else {
            self.refusals.take_due(self.clock.now())
        };
        if tallies.is_empty() {
            return 0;
        }
        let refused: u64 = tallies.iter().map(Tally::count).sum();
        if let Err(e) = self
            .store
            .emit(tallies.iter().map(Tally::event).collect())
            .await
        {
            tracing::error!(
                refused,
                "cannot record refused attempts of identities outside the policy; counts kept to try again: {e}"
            );
            self.refusals.restore(tallies);
            return 0;
        }
        // Written: a failed sync is retried by the next commit.
        if let Err(e) = self.store.commit().await {
            tracing::error!(refused, "cannot sync the record of refused attempts: {e}");
        }
        if let Some(counter) = self.refusal_events.get() {
            counter.send_modify(|n| *n += tallies.len() as u64);
        }
        tallies.len()
    }

    /// Writes due refusal windows every [`refusals::TICK`] and as soon as a
    /// refusal finds its window due, until [`Self::close`]; the caller
    /// writes the rest with `flush_refusals(true)` once calls have stopped.
    pub async fn run_refusal_flusher(self: Arc<Self>) {
        let mut closing = self.closing.subscribe();
        let mut tick = tokio::time::interval(refusals::TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = closing.wait_for(|c| *c) => return,
                _ = tick.tick() => {}
                () = self.refusals.wait_due() => {}
            }
            self.flush_refusals(false).await;
        }
    }

    /// An admin enrolls a seed in the vault.
    pub async fn enroll_account(
        &self,
        caller: &SpiffeId,
        call: Checked<Enrollment>,
    ) -> Result<Enrolled, BrokerError> {
        self.authorised(caller, "enroll_account", &call.target, async {
            let req = call.input?;
            let account_id = req.account.as_str();
            let rules = self.policy();
            let account = Self::account(&rules, &req.account).map_err(|e| match e {
                BrokerError::NotFound(_) => not_enrollable(&rules, account_id),
                e => e,
            })?;
            if !account.has(caller, Role::Admin) {
                return Err(lacks_role(caller, Role::Admin, &account.id));
            }
            let Some(seed) = req.seed else {
                return Err(BrokerError::invalid(
                    "no seed given; pass an otpauth:// URI or a Base32 secret on stdin",
                ));
            };
            // Replacing a seed under a signed policy takes M admins.
            let action = if req.replace {
                self.admin_consent(
                    account,
                    AdminAction::EnrollReplace,
                    req.action_id.as_deref(),
                )
                .await?
            } else {
                None
            };
            // The vault stores a seed only for an enrollment grant naming
            // the account and, as its operator, the admin.
            let grant_id = GrantSigner::new_grant_id();
            let (_, grant) = self.grants.sign(
                grant_id.clone(),
                admin_grant(GrantPurpose::Enroll, account_id, caller),
                self.clock.now(),
            );
            let answer = self
                .vault
                .enroll(EnrollRequest {
                    account_id: account_id.to_owned(),
                    seed: Some(seed),
                    algorithm: req.algorithm,
                    digits: req.digits,
                    period: req.period,
                    issuer: req.issuer,
                    label: req.label,
                    replace: req.replace,
                    // Ignored by the vault (the grant names the admin); kept
                    // for the wire.
                    actor: caller.to_string(),
                    grant: Some(grant),
                    // 0 is the vault's default; the vault checks it
                    // against the period.
                    min_seconds_left: req.min_seconds_left,
                    consent: action.as_ref().map(|a| a.consent()),
                })
                .await?;
            let event = EventDraft::new(caller.to_string(), "account.enrolled")
                .account(account_id)
                .attr("grant_id", grant_id)
                .attr("replace", req.replace.to_string());
            self.action_done(event, action.as_ref()).await?;
            Ok(Enrolled(answer))
        })
        .await
    }

    /// Enrolled accounts the caller has a role on.
    pub async fn list_accounts(&self, caller: &SpiffeId) -> Result<Accounts, BrokerError> {
        self.known(caller)?;
        let accounts = self.vault.list_accounts().await?;
        let policy = self.policy();
        Ok(Accounts(
            accounts
                .into_iter()
                .filter(|a| {
                    policy
                        .account(&a.account_id)
                        .is_some_and(|p| !p.roles_of(caller).is_empty())
                })
                .collect(),
        ))
    }

    /// An admin removes an account from the vault with a removal grant.
    pub async fn remove_account(
        &self,
        caller: &SpiffeId,
        call: Checked<Removal>,
    ) -> Result<Removed, BrokerError> {
        self.authorised(caller, "remove_account", &call.target, async {
            let req = call.input?;
            let rules = self.policy();
            let account = Self::account(&rules, &req.account)?;
            if !account.has(caller, Role::Admin) {
                return Err(lacks_role(caller, Role::Admin, &account.id));
            }
            if req.reason.trim().is_empty() {
                return Err(BrokerError::invalid(
                    "reason is required; say why the account is removed",
                ));
            }
            let action = self
                .admin_consent(account, AdminAction::Remove, req.action_id.as_deref())
                .await?;
            let grant_id = GrantSigner::new_grant_id();
            let (_, signed) = self.grants.sign(
                grant_id.clone(),
                admin_grant(GrantPurpose::Remove, &account.id, caller),
                self.clock.now(),
            );
            let removed = self
                .vault
                .remove_account(RemoveAccountRequest {
                    grant: Some(signed),
                    consent: action.as_ref().map(|a| a.consent()),
                })
                .await?;
            let event = EventDraft::new(caller.to_string(), "account.removed")
                .account(&account.id)
                .attr("grant_id", grant_id)
                .attr("reason", req.reason.chars().take(1000).collect::<String>());
            self.action_done(event, action.as_ref()).await?;
            Ok(Removed(removed))
        })
        .await
    }

    /// Expires every request whose time ran out; returns how many.
    pub async fn sweep(&self) -> Result<usize, BrokerError> {
        let now = self.clock.now();
        let due: Vec<String> = self
            .store
            .all()
            .await?
            .into_iter()
            .filter(|r| r.is_due(now))
            .map(|r| r.id)
            .collect();
        let mut expired = 0;
        for id in due {
            match self.act(&id, true, |_, _, _| Ok(Effects::default())).await {
                Err(BrokerError::FailedPrecondition(_)) | Ok(_) => expired += 1,
                Err(e) => return Err(e),
            }
        }
        Ok(expired)
    }

    /// Sweeps every `every` until dropped.
    pub async fn run_sweeper(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.sweep().await {
                tracing::error!("expiry sweep failed: {e}");
            }
        }
    }
}
