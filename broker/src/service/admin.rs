//! The admins' calls: proposing, signing and applying a new version of the
//! signed policy (the vault verifies and holds it; the broker keeps the
//! proposals and their signatures meanwhile), and M-of-N admin actions on an
//! account (each admin's statement collected per action id, then forwarded
//! with the account call that carries the action out).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use twokey_consent::{
    Policy as SignedPolicyDoc, PolicyError as SignedPolicyError, StatementRef, TrustRoot,
    VerifiedPolicy, admin::action_name, sshsig::parse_signature, statement::AdminAction,
    statement::StatementKind, verify_policy_update,
};
use twokey_runtime::{SpiffeId, error::ErrorKind, events::EventDraft, grant::GrantSigner};

use super::{Broker, admin_grant};
use crate::{
    calls::{
        AccountChanged, AdminActionSigned, AdminActions, AdminSignature, Applied, Checked,
        PolicyApply, PolicyProposal, PolicySignature, PolicyState, ProposalView, Restoration,
        Toggle,
    },
    consent::{self, StoredStatement, refused},
    error::BrokerError,
    policy::{AccountPolicy, Role},
    state::{count, lacks_role, millis},
    store::{DocChange, Docs},
    vault::{
        AdminConsent, ApplyPolicyRequest, GrantPurpose, RestoreAccountRequest,
        SetAccountEnabledRequest,
    },
};

mod bytes {
    use base64::{Engine, engine::general_purpose::STANDARD};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(list: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(list.iter().map(|b| STANDARD.encode(b)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .into_iter()
            .map(|t| STANDARD.decode(t).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// A proposed policy version collecting admin signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// The version, from the document.
    pub version: u64,
    /// The exact TOML document.
    pub document: String,
    /// Detached signatures over the document, each verified when it came.
    #[serde(with = "bytes")]
    pub signatures: Vec<Vec<u8>>,
    /// SPIFFE IDs of the admins who signed, in order.
    pub signed_by: Vec<String>,
    /// Who proposed it.
    pub proposed_by: String,
    /// When, Unix ms.
    pub at_ms: u64,
}

impl Proposal {
    /// SHA-256 of the document.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.document.as_bytes()).into()
    }
}

/// An admin action collecting its admins' statements.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminActionRecord {
    /// The single-use action id the statements share.
    pub action_id: String,
    /// The account.
    pub account_id: String,
    /// The action (`twokey.consent.v1.AdminAction` number).
    pub action: i32,
    /// SPIFFE IDs of the admins who signed, in order.
    pub signed_by: Vec<String>,
    /// Distinct admins the action needs.
    pub needed: u32,
    /// The statements, in the order they came.
    pub statements: Vec<StoredStatement>,
    /// When the first came, Unix ms.
    pub created_ms: u64,
}

impl AdminActionRecord {
    /// The statements as the vault takes them.
    pub fn consent(&self) -> AdminConsent {
        AdminConsent {
            statements: self.statements.iter().map(Into::into).collect(),
        }
    }

    fn action(&self) -> AdminAction {
        AdminAction::try_from(self.action).unwrap_or_default()
    }
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, BrokerError> {
    serde_json::from_slice(bytes)
        .map_err(|e| BrokerError::Store(format!("a stored {what} does not decode: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, BrokerError> {
    serde_json::to_vec(value).map_err(|e| BrokerError::Store(e.to_string()))
}

fn proposal_key(version: u64) -> String {
    format!("{version:020}")
}

fn no_policy(what: &str) -> BrokerError {
    refused(
        ErrorKind::FailedPrecondition,
        format!(
            "no signed policy is in force: {what} needs M admins' signed consent under one; admins apply one with `twokey policy propose/sign/apply`"
        ),
    )
}

/// The SPIFFE ID of the admin whose key made `signature`, among the people
/// who may sign the next version.
fn policy_signer(
    active: Option<&VerifiedPolicy>,
    root: &TrustRoot,
    signature: &[u8],
) -> Option<String> {
    let sig = parse_signature(signature).ok()?;
    let key = sig.public_key();
    let owns = |p: &twokey_consent::Person| p.keys().iter().any(|k| k.key_data() == key);
    let person = match active {
        Some(policy) => policy.admins().into_iter().find(|p| owns(p)).cloned(),
        None => root.admins().iter().find(|p| owns(p)).cloned(),
    }?;
    person.ids().first().cloned()
}

/// What an update of one stored document comes to: the document as it is
/// (stored again unchanged, no events), or a new value and its event.
enum Outcome<T> {
    Unchanged(T),
    Changed(T, EventDraft),
}

impl Broker {
    /// Updates the document under `key` through `f` (given the stored bytes,
    /// none when absent), commits, and answers the document `f` settled on;
    /// `what` names it should no document come out.
    async fn update_one<T: Serialize + Send>(
        &self,
        kind: Docs,
        key: &str,
        what: &str,
        mut f: impl FnMut(Option<&[u8]>) -> Result<Outcome<T>, BrokerError> + Send,
    ) -> Result<T, BrokerError> {
        let mut out = None;
        self.store
            .update_doc(kind, key, &mut |current| {
                Ok(match f(current.as_deref())? {
                    Outcome::Unchanged(doc) => {
                        out = Some(doc);
                        DocChange {
                            value: current,
                            events: Vec::new(),
                        }
                    }
                    Outcome::Changed(doc, event) => {
                        let value = encode(&doc)?;
                        out = Some(doc);
                        DocChange {
                            value: Some(value),
                            events: vec![event],
                        }
                    }
                })
            })
            .await?;
        self.store.commit().await?;
        out.ok_or_else(|| BrokerError::Store(format!("the {what} was not stored")))
    }

    /// Refuses a caller who is an admin of no account in the rules in force
    /// and no admin of the signed policy in force.
    fn any_admin(&self, caller: &SpiffeId) -> Result<(), BrokerError> {
        let policy_admin = self.signed.active().is_some_and(|p| {
            p.admins()
                .iter()
                .any(|a| a.ids().iter().any(|id| id == caller.as_str()))
        });
        if policy_admin || self.policy().accounts().any(|a| a.has(caller, Role::Admin)) {
            Ok(())
        } else {
            Err(BrokerError::denied(format!(
                "{caller} is not an admin of any account; only admins propose, sign and apply policy versions and admin actions"
            )))
        }
    }

    async fn load_action(&self, id: &str) -> Result<Option<AdminActionRecord>, BrokerError> {
        self.store
            .doc(Docs::AdminActions, id)
            .await?
            .map(|b| decode(&b, "admin action"))
            .transpose()
    }

    async fn load_proposal(&self, version: u64) -> Result<Proposal, BrokerError> {
        let bytes = self
            .store
            .doc(Docs::Proposals, &proposal_key(version))
            .await?
            .ok_or_else(|| {
                BrokerError::NotFound(format!(
                    "no proposed policy version {version}; list the proposals with `twokey policy show`"
                ))
            })?;
        decode(&bytes, "policy proposal")
    }

    /// The collected admin consent an account call carries out: none
    /// without a signed policy in force; with one, the call names an open
    /// action for this account and action that enough admins signed.
    pub(super) async fn admin_consent(
        &self,
        account: &AccountPolicy,
        action: AdminAction,
        action_id: Option<&str>,
    ) -> Result<Option<AdminActionRecord>, BrokerError> {
        let Some(policy) = self.signed.active() else {
            return Ok(None);
        };
        let need = policy.admin_threshold();
        let what = action_name(action);
        let Some(id) = action_id else {
            return Err(refused(
                ErrorKind::FailedPrecondition,
                format!(
                    "signed policy version {} is in force: to {what} account {} takes the {} admin action signed by {} of the account: one admin starts it (the same `twokey account` command without --action prints its id), each signs it with `twokey account sign-action ID`, then run the command with --action ID",
                    policy.version(),
                    account.id,
                    action.as_str_name(),
                    count(need, "admin", "admins")
                ),
            ));
        };
        let record = self.load_action(id).await?.ok_or_else(|| {
            BrokerError::NotFound(format!(
                "no open admin action {:?}; list the open ones with `twokey account actions`",
                id.chars().take(70).collect::<String>()
            ))
        })?;
        if record.account_id != account.id || record.action() != action {
            return Err(refused(
                ErrorKind::FailedPrecondition,
                format!(
                    "admin action {id} is to {} account {}, not to {what} account {}",
                    action_name(record.action()),
                    record.account_id,
                    account.id
                ),
            ));
        }
        if (record.signed_by.len() as u64) < u64::from(need) {
            return Err(refused(
                ErrorKind::FailedPrecondition,
                format!(
                    "admin action {id} to {what} account {} needs {} of the account, {} signed ({}); collect more admin signatures",
                    account.id,
                    count(need, "admin", "distinct admins"),
                    record.signed_by.len(),
                    record.signed_by.join(", ")
                ),
            ));
        }
        Ok(Some(record))
    }

    /// Records that an account call succeeded: its event (naming the admin
    /// action and its signers, if any) and, in the same transaction, the
    /// action dropped.
    pub(super) async fn action_done(
        &self,
        event: EventDraft,
        action: Option<&AdminActionRecord>,
    ) -> Result<(), BrokerError> {
        let Some(action) = action else {
            return self.emit(event).await;
        };
        let event = event
            .attr("action_id", action.action_id.clone())
            .attr("signed_by", action.signed_by.join(","));
        let mut event = Some(event);
        self.store
            .update_doc(Docs::AdminActions, &action.action_id, &mut |_| {
                Ok(DocChange {
                    value: None,
                    events: event.clone().into_iter().collect(),
                })
            })
            .await?;
        event.take();
        self.store.commit().await
    }

    /// An admin disables or enables an account, carrying out a DISABLE or
    /// ENABLE admin action (only under a signed policy).
    pub async fn set_account_enabled(
        &self,
        caller: &SpiffeId,
        call: Checked<Toggle>,
    ) -> Result<AccountChanged, BrokerError> {
        self.authorised(caller, "set_account_enabled", &call.target, async {
            let req = call.input?;
            let rules = self.policy();
            let account = Self::account(&rules, &req.account)?;
            if !account.has(caller, Role::Admin) {
                return Err(lacks_role(caller, Role::Admin, &account.id));
            }
            let (action, what) = if req.enabled {
                (AdminAction::Enable, "enabling an account")
            } else {
                (AdminAction::Disable, "disabling an account")
            };
            let record = self
                .admin_consent(account, action, req.action_id.as_deref())
                .await?
                .ok_or_else(|| no_policy(what))?;
            let grant_id = GrantSigner::new_grant_id();
            let (_, grant) = self.grants.sign(
                grant_id.clone(),
                admin_grant(GrantPurpose::SetEnabled, &account.id, caller),
                self.clock.now(),
            );
            let changed = self
                .vault
                .set_account_enabled(SetAccountEnabledRequest {
                    grant: Some(grant),
                    enabled: req.enabled,
                    consent: Some(record.consent()),
                })
                .await?;
            let name = if req.enabled {
                "account.enabled"
            } else {
                "account.disabled"
            };
            let event = EventDraft::new(caller.to_string(), name)
                .account(&account.id)
                .attr("grant_id", grant_id);
            self.action_done(event, Some(&record)).await?;
            Ok(AccountChanged(changed))
        })
        .await
    }

    /// An admin restores a replaced or removed seed, carrying out a RESTORE
    /// admin action (only under a signed policy).
    pub async fn restore_account(
        &self,
        caller: &SpiffeId,
        call: Checked<Restoration>,
    ) -> Result<AccountChanged, BrokerError> {
        self.authorised(caller, "restore_account", &call.target, async {
            let req = call.input?;
            let rules = self.policy();
            let account = Self::account(&rules, &req.account)?;
            if !account.has(caller, Role::Admin) {
                return Err(lacks_role(caller, Role::Admin, &account.id));
            }
            let record = self
                .admin_consent(account, AdminAction::Restore, req.action_id.as_deref())
                .await?
                .ok_or_else(|| no_policy("restoring a seed"))?;
            let grant_id = GrantSigner::new_grant_id();
            let (_, grant) = self.grants.sign(
                grant_id.clone(),
                admin_grant(GrantPurpose::Restore, &account.id, caller),
                self.clock.now(),
            );
            let restored = self
                .vault
                .restore_account(RestoreAccountRequest {
                    grant: Some(grant),
                    consent: Some(record.consent()),
                })
                .await?;
            let event = EventDraft::new(caller.to_string(), "account.restored")
                .account(&account.id)
                .attr("grant_id", grant_id);
            self.action_done(event, Some(&record)).await?;
            Ok(AccountChanged(restored))
        })
        .await
    }

    /// Adds the caller's admin-action statement to the action its id names,
    /// starting the action when the id is new.
    pub async fn sign_admin_action(
        &self,
        caller: &SpiffeId,
        call: Checked<AdminSignature>,
    ) -> Result<AdminActionSigned, BrokerError> {
        self.authorised(caller, "sign_admin_action", &call.target, async {
            let AdminSignature(given) = call.input?;
            let policy = self
                .policy_for(std::iter::once(&given))
                .await
                .ok_or_else(|| no_policy("an admin action"))?;
            let now = self.clock.now();
            let at = StatementRef::AdminAction(0);
            let opened =
                consent::open(Some(&policy), at, &given, StatementKind::AdminAction, now)?;
            consent::signed_by(&opened, at, caller)?;
            let b = consent::check_admin(&opened, at)?;
            let rules = self.policy();
            let account = rules
                .account(&b.account_id)
                .ok_or_else(|| super::unknown_account(&rules, &b.account_id))?;
            if !account.has(caller, Role::Admin) {
                return Err(lacks_role(caller, Role::Admin, &account.id));
            }
            let needed = policy.admin_threshold();
            let action = AdminAction::try_from(b.action).unwrap_or_default();
            self.update_one(Docs::AdminActions, &b.action_id, "admin action", |current| {
                let mut record = match current {
                    Some(bytes) => decode::<AdminActionRecord>(bytes, "admin action")?,
                    None => AdminActionRecord {
                        action_id: b.action_id.clone(),
                        account_id: b.account_id.clone(),
                        action: b.action,
                        signed_by: Vec::new(),
                        needed,
                        statements: Vec::new(),
                        created_ms: millis(now),
                    },
                };
                if record.account_id != b.account_id || record.action != b.action {
                    return Err(refused(
                        ErrorKind::FailedPrecondition,
                        format!(
                            "admin action {} is to {} account {}; your statement says {} account {}: sign one for that action, or pick a new action id",
                            b.action_id,
                            action_name(record.action()),
                            record.account_id,
                            action_name(action),
                            b.account_id
                        ),
                    ));
                }
                if record.signed_by.iter().any(|s| s == caller.as_str()) {
                    return Err(refused(
                        ErrorKind::FailedPrecondition,
                        format!(
                            "{caller} signed admin action {} already; another admin must sign",
                            b.action_id
                        ),
                    ));
                }
                record.statements.push(StoredStatement::from(&given));
                record.signed_by.push(caller.to_string());
                record.needed = needed;
                let event = EventDraft::new(caller.to_string(), "admin_action.signed")
                    .account(&record.account_id)
                    .attr("action_id", record.action_id.clone())
                    .attr("action", action_name(action))
                    .attr("statement", hex::encode(opened.digest))
                    .attr(
                        "signatures",
                        format!("{}/{}", record.signed_by.len(), record.needed),
                    );
                Ok(Outcome::Changed(record, event))
            })
            .await
            .map(AdminActionSigned)
        })
        .await
    }

    /// The open admin actions on accounts the caller is an admin of, newest
    /// first.
    pub async fn list_admin_actions(&self, caller: &SpiffeId) -> Result<AdminActions, BrokerError> {
        self.known(caller)?;
        self.any_admin(caller)?;
        let mut actions: Vec<AdminActionRecord> = self
            .store
            .docs(Docs::AdminActions)
            .await?
            .iter()
            .map(|b| decode::<AdminActionRecord>(b, "admin action"))
            .collect::<Result<_, _>>()?;
        let rules = self.policy();
        actions.retain(|a| {
            rules
                .account(&a.account_id)
                .is_some_and(|p| p.has(caller, Role::Admin))
        });
        actions.sort_by(|a, b| (b.created_ms, &b.action_id).cmp(&(a.created_ms, &a.action_id)));
        Ok(AdminActions(actions))
    }

    /// The vault's applied versions, newest first; the broker's cache is
    /// brought up to date from them on the way.
    async fn applied_versions(&self) -> Result<Vec<crate::vault::PolicyVersion>, BrokerError> {
        let applied = self.vault.get_policy().await?;
        if let Err(e) = self.signed.adopt(&applied) {
            tracing::error!("{e}");
        }
        Ok(applied)
    }

    /// An admin proposes a new policy version: it must parse and be above
    /// the active version.
    pub async fn propose_policy(
        &self,
        caller: &SpiffeId,
        call: Checked<PolicyProposal>,
    ) -> Result<ProposalView, BrokerError> {
        self.authorised(caller, "propose_policy", &call.target, async {
            let PolicyProposal { document } = call.input?;
            self.any_admin(caller)?;
            let parsed = SignedPolicyDoc::parse(&document)?;
            if let Some(root) = self.signed.root()
                && parsed.trust_domain() != root.trust_domain()
            {
                return Err(SignedPolicyError::TrustDomain {
                    expected: root.trust_domain().to_owned(),
                    found: parsed.trust_domain().to_owned(),
                }
                .into());
            }
            let applied = self.applied_versions().await?;
            let active = applied.first().map_or(0, |v| v.version);
            let version = parsed.version();
            if version <= active {
                return Err(SignedPolicyError::NotNewer {
                    proposed: version,
                    active,
                }
                .into());
            }
            let now = millis(self.clock.now());
            self.update_one(Docs::Proposals, &proposal_key(version), "proposal", |current| {
                if let Some(bytes) = current {
                    let existing: Proposal = decode(bytes, "policy proposal")?;
                    if existing.document != document {
                        return Err(refused(
                            ErrorKind::FailedPrecondition,
                            format!(
                                "version {version} is proposed already (by {}) with another document; sign that one, or propose version {}",
                                existing.proposed_by,
                                version + 1
                            ),
                        ));
                    }
                    return Ok(Outcome::Unchanged(existing));
                }
                let proposal = Proposal {
                    version,
                    document: document.clone(),
                    signatures: Vec::new(),
                    signed_by: Vec::new(),
                    proposed_by: caller.to_string(),
                    at_ms: now,
                };
                let event = EventDraft::new(caller.to_string(), "policy.proposed")
                    .attr("version", version.to_string())
                    .attr("digest", hex::encode(proposal.digest()));
                Ok(Outcome::Changed(proposal, event))
            })
            .await
            .map(ProposalView)
        })
        .await
    }

    /// Adds a detached signature to a proposed version: it must verify over
    /// the document, by a key of an admin of the active version (of the
    /// pinned admins before the first).
    pub async fn sign_policy(
        &self,
        caller: &SpiffeId,
        call: Checked<PolicySignature>,
    ) -> Result<ProposalView, BrokerError> {
        self.authorised(caller, "sign_policy", &call.target, async {
            let PolicySignature { version, signature } = call.input?;
            self.any_admin(caller)?;
            let Some(root) = self.signed.root() else {
                return Err(refused(
                    ErrorKind::FailedPrecondition,
                    "the broker has no [consent] section (admins_file, threshold), so it cannot check policy signatures; configure it",
                ));
            };
            let proposal = self.load_proposal(version).await?;
            self.applied_versions().await?;
            let active = self.signed.active();
            match verify_policy_update(
                active.as_deref(),
                root,
                proposal.document.as_bytes(),
                std::slice::from_ref(&signature),
            ) {
                Ok(_) | Err(SignedPolicyError::TooFewSignatures { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            let signer = policy_signer(active.as_deref(), root, &signature).ok_or_else(|| {
                BrokerError::Store("a verified policy signature names no admin".into())
            })?;
            self.update_one(Docs::Proposals, &proposal_key(version), "proposal", |current| {
                let Some(bytes) = current else {
                    return Err(BrokerError::NotFound(format!(
                        "proposed policy version {version} was applied or withdrawn meanwhile"
                    )));
                };
                let mut p: Proposal = decode(bytes, "policy proposal")?;
                if p.signed_by.contains(&signer) {
                    return Ok(Outcome::Unchanged(p));
                }
                p.signatures.push(signature.clone());
                p.signed_by.push(signer.clone());
                let event = EventDraft::new(caller.to_string(), "policy.signed")
                    .attr("version", version.to_string())
                    .attr("digest", hex::encode(p.digest()))
                    .attr("signer", signer.clone());
                Ok(Outcome::Changed(p, event))
            })
            .await
            .map(ProposalView)
        })
        .await
    }

    /// Hands a proposed version and its signatures to the vault; once it is
    /// applied the broker's cache follows and proposals up to it are
    /// dropped. A refusal by the vault is answered as the vault gave it.
    pub async fn apply_policy(
        &self,
        caller: &SpiffeId,
        call: Checked<PolicyApply>,
    ) -> Result<Applied, BrokerError> {
        self.authorised(caller, "apply_policy", &call.target, async {
            let PolicyApply { version } = call.input?;
            self.any_admin(caller)?;
            let proposal = self.load_proposal(version).await?;
            let applied = self
                .vault
                .apply_policy(ApplyPolicyRequest {
                    document: proposal.document.clone(),
                    signatures: proposal.signatures.clone(),
                })
                .await?;
            if let Err(e) = self.signed.refresh(&*self.vault).await {
                tracing::error!(
                    "policy version {} applied, but the broker cannot load it: {e}",
                    applied.version
                );
            }
            // The rules follow the new version now.
            self.policy();
            let stale: Vec<u64> = self
                .store
                .docs(Docs::Proposals)
                .await?
                .iter()
                .filter_map(|b| decode::<Proposal>(b, "policy proposal").ok())
                .map(|p| p.version)
                .filter(|v| *v <= applied.version)
                .collect();
            let mut event = Some(
                EventDraft::new(caller.to_string(), "policy.applied")
                    .attr("version", applied.version.to_string())
                    .attr("digest", hex::encode(&applied.digest))
                    .attr("signed_by", applied.signed_by.join(",")),
            );
            for v in stale {
                let events: Vec<EventDraft> = event.take().into_iter().collect();
                self.store
                    .update_doc(Docs::Proposals, &proposal_key(v), &mut |_| {
                        Ok(DocChange {
                            value: None,
                            events: events.clone(),
                        })
                    })
                    .await?;
            }
            if let Some(event) = event {
                self.store.emit(vec![event]).await?;
            }
            self.store.commit().await?;
            Ok(Applied(applied))
        })
        .await
    }

    /// The applied versions (from the vault, the active one first) and the
    /// open proposals above the active one.
    pub async fn get_policy(&self, caller: &SpiffeId) -> Result<PolicyState, BrokerError> {
        self.known(caller)?;
        let applied = self.applied_versions().await?;
        let active = applied.first().map_or(0, |v| v.version);
        let proposals = self
            .store
            .docs(Docs::Proposals)
            .await?
            .iter()
            .map(|b| decode::<Proposal>(b, "policy proposal"))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|p| p.version > active)
            .collect();
        Ok(PolicyState { applied, proposals })
    }
}
