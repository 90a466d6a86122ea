//! The admin-signed policy: a versioned TOML document naming the people (a
//! SPIFFE ID or more and one OpenSSH key or more each), who holds which role
//! on each account, the counts, windows and rate; detached sshsig signatures
//! by M of the previous version's admins (or of the admin set the vault's
//! config pins) make it a [`VerifiedPolicy`], the only form the checks take.
//!
//! A person is the unit of distinctness: a key or a SPIFFE ID listed for two
//! people is refused, so two entries can never count one human twice.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use ssh_key::PublicKey;

use crate::allowed_signers::{format_allowed_signer, parse_allowed_signers};
use crate::error::{PolicyError, Role};
use crate::sshsig::{
    VerifyFailure, consent_namespace, fingerprint, parse_signature, policy_namespace,
    supported_algorithm, verify,
};
use crate::time::parse_duration;

/// Largest policy document accepted.
pub const MAX_POLICY_BYTES: usize = 1 << 20;
/// Most detached signatures accepted on one policy document.
pub const MAX_POLICY_SIGNATURES: usize = 64;

const DAY: u64 = 86_400;

// ---- The TOML schema -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    version: u64,
    trust_domain: String,
    admins: AdminsDoc,
    admin_action_window: Option<String>,
    people: BTreeMap<String, PersonDoc>,
    #[serde(default)]
    accounts: BTreeMap<String, AccountDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminsDoc {
    people: Vec<String>,
    threshold: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PersonDoc {
    ids: Vec<String>,
    keys: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountDoc {
    requesters: Vec<String>,
    approvers: Vec<String>,
    operators: Vec<String>,
    admins: Option<Vec<String>>,
    #[serde(default)]
    intake: Vec<String>,
    approvals_required: Option<u32>,
    codes_per_request: Option<u32>,
    request_window: Option<String>,
    release_window: Option<String>,
    release_freshness: Option<String>,
    release_rate: Option<RateDoc>,
    recovery_window: Option<String>,
    aws_account_id: Option<String>,
    signin_window: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateDoc {
    max: u32,
    per: String,
}

// ---- The parsed policy -----------------------------------------------------

/// One person: the unit of distinctness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    name: String,
    ids: Vec<String>,
    keys: Vec<PublicKey>,
}

impl Person {
    /// A person with their SPIFFE IDs and OpenSSH public keys.
    pub fn new(name: impl Into<String>, ids: Vec<String>, keys: Vec<PublicKey>) -> Self {
        Self {
            name: name.into(),
            ids,
            keys,
        }
    }

    /// The person's name in the policy.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The person's SPIFFE IDs.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// The person's public keys.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }
}

/// A rate limit: at most `max` events in any window of `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Events allowed in the window.
    pub max: u32,
    /// The window.
    pub per: Duration,
}

/// What the policy says about one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountPolicy {
    requesters: BTreeSet<usize>,
    intake: BTreeSet<usize>,
    approvers: BTreeSet<usize>,
    operators: BTreeSet<usize>,
    admins: BTreeSet<usize>,
    /// Distinct approvals a release needs.
    pub approvals_required: u32,
    /// Codes one request may release.
    pub codes_per_request: u32,
    /// How long after its creation a request may be approved.
    pub request_window: Duration,
    /// How long after the approval that completes it a request may be
    /// released.
    pub release_window: Duration,
    /// How long an operator's release statement stays usable.
    pub release_freshness: Duration,
    /// Codes the account may release in any window.
    pub release_rate: RateLimit,
    /// How long a replaced or removed seed is kept sealed for restore.
    pub recovery_window: Duration,
    /// The AWS account whose root user this account's seed is (12 digits),
    /// if its sign-ins are reconciled (issue 20). Unique across accounts.
    pub aws_account_id: Option<String>,
    /// How long before a root sign-in a released code may be and still
    /// explain it (1m to 1h, default 10m).
    pub signin_window: Duration,
}

impl AccountPolicy {
    fn holders(&self, role: Role) -> &BTreeSet<usize> {
        match role {
            Role::Requester => &self.requesters,
            Role::Intake => &self.intake,
            Role::Approver => &self.approvers,
            Role::Operator => &self.operators,
            Role::Admin => &self.admins,
        }
    }
}

/// A parsed and validated policy document. Checks take a
/// [`VerifiedPolicy`], which only [`verify_policy_update`] makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    version: u64,
    trust_domain: String,
    people: Vec<Person>,
    by_id: BTreeMap<String, usize>,
    by_key: BTreeMap<String, usize>,
    admins: BTreeSet<usize>,
    admin_threshold: u32,
    admin_action_window: Duration,
    accounts: BTreeMap<String, AccountPolicy>,
}

fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn valid_trust_domain(s: &str) -> bool {
    (1..=255).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_".contains(&b))
}

/// A SPIFFE ID in `trust_domain` with a non-empty path of plain segments
/// (no commas, quotes or spaces, so that it is a valid `allowed_signers`
/// principal).
fn valid_spiffe_id(id: &str, trust_domain: &str) -> bool {
    let Some(path) = id
        .strip_prefix("spiffe://")
        .and_then(|r| r.strip_prefix(trust_domain))
        .and_then(|r| r.strip_prefix('/'))
    else {
        return false;
    };
    id.len() <= 2048
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
}

fn duration_field(
    value: Option<&str>,
    default: &str,
    max_secs: u64,
    what: &str,
) -> Result<Duration, PolicyError> {
    let d = parse_duration(value.unwrap_or(default))
        .map_err(|e| PolicyError::Invalid(format!("{what}: {e}")))?;
    if d.is_zero() || d.as_secs() > max_secs {
        return Err(PolicyError::Invalid(format!(
            "{what} must be more than 0s and at most {}d",
            max_secs / DAY
        )));
    }
    Ok(d)
}

/// Indexes people by SPIFFE ID and key fingerprint, refusing an ID or a key
/// listed for two people.
type Indexes = (BTreeMap<String, usize>, BTreeMap<String, usize>);

fn index_people(people: &[Person], trust_domain: &str) -> Result<Indexes, PolicyError> {
    let mut by_id: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_key: BTreeMap<String, usize> = BTreeMap::new();
    for (i, p) in people.iter().enumerate() {
        if p.ids.is_empty() || p.keys.is_empty() {
            return Err(PolicyError::Invalid(format!(
                "person {} needs at least one SPIFFE ID and one key",
                p.name
            )));
        }
        for id in &p.ids {
            if !valid_spiffe_id(id, trust_domain) {
                return Err(PolicyError::Invalid(format!(
                    "person {}: {id:?} is not a SPIFFE ID in trust domain {trust_domain} (spiffe://{trust_domain}/<path of [A-Za-z0-9._-] segments>)",
                    p.name
                )));
            }
            if let Some(&j) = by_id.get(id) {
                if j == i {
                    return Err(PolicyError::Invalid(format!(
                        "person {} lists {id} twice",
                        p.name
                    )));
                }
                return Err(PolicyError::SharedIdentity {
                    id: id.clone(),
                    first: people[j].name.clone(),
                    second: p.name.clone(),
                });
            }
            by_id.insert(id.clone(), i);
        }
        for key in &p.keys {
            if !supported_algorithm(&key.algorithm()) {
                return Err(PolicyError::Invalid(format!(
                    "person {}: key type {} is not supported (ssh-ed25519, sk-ssh-ed25519@openssh.com)",
                    p.name,
                    key.algorithm()
                )));
            }
            let fp = fingerprint(key.key_data());
            if let Some(&j) = by_key.get(&fp) {
                if j == i {
                    return Err(PolicyError::Invalid(format!(
                        "person {} lists key {fp} twice",
                        p.name
                    )));
                }
                return Err(PolicyError::SharedKey {
                    fingerprint: fp,
                    first: people[j].name.clone(),
                    second: p.name.clone(),
                });
            }
            by_key.insert(fp, i);
        }
    }
    Ok((by_id, by_key))
}

fn name_set(
    names: &[String],
    index: &BTreeMap<&str, usize>,
    what: &str,
) -> Result<BTreeSet<usize>, PolicyError> {
    let mut set = BTreeSet::new();
    for n in names {
        let i = *index.get(n.as_str()).ok_or_else(|| {
            PolicyError::Invalid(format!("{what} names {n:?}, who is not in [people]"))
        })?;
        if !set.insert(i) {
            return Err(PolicyError::Invalid(format!("{what} names {n} twice")));
        }
    }
    Ok(set)
}

impl Policy {
    /// Parses and validates a policy document. This says nothing about who
    /// signed it: see [`verify_policy_update`].
    pub fn parse(document: &str) -> Result<Self, PolicyError> {
        if document.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::Parse(format!(
                "the document is larger than {MAX_POLICY_BYTES} bytes"
            )));
        }
        let doc: Doc = toml::from_str(document).map_err(|e| PolicyError::Parse(e.to_string()))?;
        if doc.version == 0 {
            return Err(PolicyError::Invalid("version must be 1 or more".into()));
        }
        if !valid_trust_domain(&doc.trust_domain) {
            return Err(PolicyError::Invalid(format!(
                "trust_domain {:?} is not a trust domain name",
                doc.trust_domain
            )));
        }
        let mut people = Vec::with_capacity(doc.people.len());
        for (name, p) in &doc.people {
            if !valid_name(name) {
                return Err(PolicyError::Invalid(format!(
                    "person name {name:?}: use 1 to 64 of a-z, 0-9, '.', '_', '-'"
                )));
            }
            let mut keys = Vec::with_capacity(p.keys.len());
            for k in &p.keys {
                keys.push(PublicKey::from_openssh(k).map_err(|e| {
                    PolicyError::Invalid(format!("person {name}: key {k:?} does not parse: {e}"))
                })?);
            }
            people.push(Person::new(name.clone(), p.ids.clone(), keys));
        }
        let (by_id, by_key) = index_people(&people, &doc.trust_domain)?;
        let names: BTreeMap<&str, usize> = people
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.as_str(), i))
            .collect();
        let admins = name_set(&doc.admins.people, &names, "[admins] people")?;
        let threshold = doc.admins.threshold;
        if threshold == 0 || threshold as usize > admins.len() {
            return Err(PolicyError::Invalid(format!(
                "[admins] threshold must be 1 to the number of admins ({})",
                admins.len()
            )));
        }
        let admin_action_window = duration_field(
            doc.admin_action_window.as_deref(),
            "24h",
            7 * DAY,
            "admin_action_window",
        )?;
        let mut accounts = BTreeMap::new();
        for (id, a) in &doc.accounts {
            if !valid_name(id) {
                return Err(PolicyError::Invalid(format!(
                    "account id {id:?}: use 1 to 64 of a-z, 0-9, '.', '_', '-'"
                )));
            }
            accounts.insert(id.clone(), account(id, a, &names, &admins, threshold)?);
        }
        let mut aws_ids: BTreeMap<&str, &str> = BTreeMap::new();
        for (id, a) in &accounts {
            if let Some(aws) = a.aws_account_id.as_deref()
                && let Some(first) = aws_ids.insert(aws, id)
            {
                return Err(PolicyError::Invalid(format!(
                    "accounts.{id}.aws_account_id {aws} is also the aws_account_id of accounts.{first}: \
                     one AWS account has one root user, map it to one account"
                )));
            }
        }
        Ok(Self {
            version: doc.version,
            trust_domain: doc.trust_domain,
            people,
            by_id,
            by_key,
            admins,
            admin_threshold: threshold,
            admin_action_window,
            accounts,
        })
    }

    /// The version number.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The trust domain all SPIFFE IDs are in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Every person.
    pub fn people(&self) -> &[Person] {
        &self.people
    }

    /// The people who sign the next policy version and take part in admin
    /// actions on accounts without their own `admins`.
    pub fn admins(&self) -> Vec<&Person> {
        self.admins.iter().map(|&i| &self.people[i]).collect()
    }

    /// M: distinct admins needed for a policy update or an admin action.
    pub fn admin_threshold(&self) -> u32 {
        self.admin_threshold
    }

    /// How long an admin's action statement stays usable.
    pub fn admin_action_window(&self) -> Duration {
        self.admin_action_window
    }

    /// What the policy says about an account.
    pub fn account(&self, account_id: &str) -> Option<&AccountPolicy> {
        self.accounts.get(account_id)
    }

    /// The accounts mapped to an AWS account, in order of account id:
    /// `(account, aws_account_id, signin_window)`.
    pub fn aws_accounts(&self) -> impl Iterator<Item = (&str, &str, Duration)> {
        self.accounts.iter().filter_map(|(id, a)| {
            a.aws_account_id
                .as_deref()
                .map(|aws| (id.as_str(), aws, a.signin_window))
        })
    }

    /// The account ids, in order.
    pub fn account_ids(&self) -> impl Iterator<Item = &str> {
        self.accounts.keys().map(String::as_str)
    }

    /// The names of the people holding `role` on an account (admins: the
    /// account's own, else the policy's).
    pub fn role_holders(&self, account_id: &str, role: Role) -> Vec<&str> {
        self.holders(account_id, role)
            .map(|s| s.iter().map(|&i| self.people[i].name.as_str()).collect())
            .unwrap_or_default()
    }

    /// The SPIFFE IDs of the people holding `role` on an account (admins:
    /// the account's own, else the policy's), every ID of each person, in
    /// the order of [`Self::role_holders`].
    pub fn role_holder_ids(&self, account_id: &str, role: Role) -> Vec<&str> {
        self.holders(account_id, role)
            .map(|s| {
                s.iter()
                    .flat_map(|&i| self.people[i].ids.iter().map(String::as_str))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The person a SPIFFE ID belongs to.
    pub fn person_with_id(&self, id: &str) -> Option<&Person> {
        self.person_by_id(id).map(|i| &self.people[i])
    }

    /// The policy as an OpenSSH `allowed_signers` file: one line per key,
    /// the person's SPIFFE IDs as principals, limited to the consent
    /// namespace (and the policy namespace for admins), so that an auditor
    /// can check any statement with `ssh-keygen -Y verify`.
    pub fn allowed_signers(&self) -> String {
        let consent = consent_namespace(&self.trust_domain);
        let policy = policy_namespace(&self.trust_domain);
        let mut out = String::new();
        for (i, p) in self.people.iter().enumerate() {
            let mut namespaces = vec![consent.clone()];
            if self.admins.contains(&i) {
                namespaces.push(policy.clone());
            }
            for key in &p.keys {
                out.push_str(&format_allowed_signer(&p.ids, &namespaces, key));
                out.push('\n');
            }
        }
        out
    }

    pub(crate) fn person(&self, index: usize) -> &Person {
        &self.people[index]
    }

    pub(crate) fn person_by_id(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).copied()
    }

    pub(crate) fn person_by_key(&self, fingerprint: &str) -> Option<usize> {
        self.by_key.get(fingerprint).copied()
    }

    /// Who holds `role` on the account; for Admin on an account the policy
    /// does not list, the policy's admins.
    pub(crate) fn holders(&self, account_id: &str, role: Role) -> Option<&BTreeSet<usize>> {
        match self.accounts.get(account_id) {
            Some(a) => Some(a.holders(role)),
            None if role == Role::Admin => Some(&self.admins),
            None => None,
        }
    }
}

fn account(
    id: &str,
    a: &AccountDoc,
    names: &BTreeMap<&str, usize>,
    policy_admins: &BTreeSet<usize>,
    threshold: u32,
) -> Result<AccountPolicy, PolicyError> {
    let ctx = |field: &str| format!("accounts.{id}.{field}");
    let requesters = name_set(&a.requesters, names, &ctx("requesters"))?;
    let approvers = name_set(&a.approvers, names, &ctx("approvers"))?;
    let operators = name_set(&a.operators, names, &ctx("operators"))?;
    let intake = name_set(&a.intake, names, &ctx("intake"))?;
    let admins = match &a.admins {
        Some(list) => name_set(list, names, &ctx("admins"))?,
        None => policy_admins.clone(),
    };
    for (set, field) in [
        (&requesters, "requesters"),
        (&approvers, "approvers"),
        (&operators, "operators"),
    ] {
        if set.is_empty() {
            return Err(PolicyError::Invalid(format!("{} is empty", ctx(field))));
        }
    }
    if !intake.is_disjoint(&approvers) || !intake.is_disjoint(&operators) {
        return Err(PolicyError::Invalid(format!(
            "{}: an intake identity never approves or operates; remove it from approvers and operators",
            ctx("intake")
        )));
    }
    if (admins.len() as u64) < u64::from(threshold) {
        return Err(PolicyError::Invalid(format!(
            "{} has fewer people than the admin threshold {threshold}",
            ctx("admins")
        )));
    }
    let approvals_required = a.approvals_required.unwrap_or(1);
    if !(1..=10).contains(&approvals_required) || approvals_required as usize > approvers.len() {
        return Err(PolicyError::Invalid(format!(
            "{} must be 1 to 10 and at most the number of approvers ({})",
            ctx("approvals_required"),
            approvers.len()
        )));
    }
    let codes_per_request = a.codes_per_request.unwrap_or(1);
    if !(1..=10).contains(&codes_per_request) {
        return Err(PolicyError::Invalid(format!(
            "{} must be 1 to 10",
            ctx("codes_per_request")
        )));
    }
    let release_rate = match &a.release_rate {
        Some(r) => RateLimit {
            max: r.max,
            per: duration_field(Some(&r.per), "", 7 * DAY, &ctx("release_rate.per"))?,
        },
        None => RateLimit {
            max: 4,
            per: Duration::from_secs(3600),
        },
    };
    if !(1..=1000).contains(&release_rate.max) {
        return Err(PolicyError::Invalid(format!(
            "{} must be 1 to 1000",
            ctx("release_rate.max")
        )));
    }
    Ok(AccountPolicy {
        requesters,
        intake,
        approvers,
        operators,
        admins,
        approvals_required,
        codes_per_request,
        request_window: duration_field(
            a.request_window.as_deref(),
            "1h",
            7 * DAY,
            &ctx("request_window"),
        )?,
        release_window: duration_field(
            a.release_window.as_deref(),
            "15m",
            7 * DAY,
            &ctx("release_window"),
        )?,
        release_freshness: duration_field(
            a.release_freshness.as_deref(),
            "2m",
            3600,
            &ctx("release_freshness"),
        )?,
        release_rate,
        recovery_window: duration_field(
            a.recovery_window.as_deref(),
            "7d",
            90 * DAY,
            &ctx("recovery_window"),
        )?,
        aws_account_id: match &a.aws_account_id {
            Some(aws) if aws.len() == 12 && aws.bytes().all(|b| b.is_ascii_digit()) => {
                Some(aws.clone())
            }
            Some(aws) => {
                return Err(PolicyError::Invalid(format!(
                    "{} {aws:?} is not 12 digits: write the account id AWS shows, e.g. \"123456789012\"",
                    ctx("aws_account_id")
                )));
            }
            None => None,
        },
        signin_window: signin_window(a.signin_window.as_deref(), &ctx("signin_window"))?,
    })
}

/// The default of `signin_window`.
pub const DEFAULT_SIGNIN_WINDOW: Duration = Duration::from_secs(10 * 60);

/// `signin_window`: 1 minute to 1 hour; a release earlier than that cannot
/// reasonably explain a sign-in, a shorter one misses slow operators.
fn signin_window(value: Option<&str>, what: &str) -> Result<Duration, PolicyError> {
    let Some(value) = value else {
        return Ok(DEFAULT_SIGNIN_WINDOW);
    };
    let d = parse_duration(value).map_err(|e| PolicyError::Invalid(format!("{what}: {e}")))?;
    if d < Duration::from_secs(60) || d > Duration::from_secs(3600) {
        return Err(PolicyError::Invalid(format!(
            "{what} {value:?} must be 1m to 1h"
        )));
    }
    Ok(d)
}

// ---- The root of trust and verification ------------------------------------

/// The admin set and threshold the vault's config pins: the root of trust
/// for the first policy version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustRoot {
    trust_domain: String,
    admins: Vec<Person>,
    by_key: BTreeMap<String, usize>,
    threshold: u32,
}

impl TrustRoot {
    /// A root from the admins (people with their keys) and the threshold M.
    pub fn new(
        trust_domain: &str,
        admins: Vec<Person>,
        threshold: u32,
    ) -> Result<Self, PolicyError> {
        if !valid_trust_domain(trust_domain) {
            return Err(PolicyError::Invalid(format!(
                "trust domain {trust_domain:?} is not a trust domain name"
            )));
        }
        let (_, by_key) = index_people(&admins, trust_domain)?;
        if threshold == 0 || threshold as usize > admins.len() {
            return Err(PolicyError::Invalid(format!(
                "the pinned threshold must be 1 to the number of pinned admins ({})",
                admins.len()
            )));
        }
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            admins,
            by_key,
            threshold,
        })
    }

    /// A root from `allowed_signers` text: lines whose principals overlap are
    /// one person (named by their first principal); a key on lines of two
    /// different people is refused.
    pub fn from_allowed_signers(
        trust_domain: &str,
        text: &str,
        threshold: u32,
    ) -> Result<Self, PolicyError> {
        let lines = parse_allowed_signers(text).map_err(PolicyError::Invalid)?;
        let mut people: Vec<Person> = Vec::new();
        for line in lines {
            let hit: Vec<usize> = people
                .iter()
                .enumerate()
                .filter(|(_, p)| p.ids.iter().any(|id| line.principals.contains(id)))
                .map(|(i, _)| i)
                .collect();
            // Merge every person this line touches into the first one.
            let target = match hit.first() {
                Some(&t) => t,
                None => {
                    people.push(Person::new(
                        line.principals[0].clone(),
                        Vec::new(),
                        Vec::new(),
                    ));
                    people.len() - 1
                }
            };
            for &other in hit.iter().skip(1).rev() {
                let p = people.remove(other);
                people[target].ids.extend(p.ids);
                people[target].keys.extend(p.keys);
            }
            for id in line.principals {
                if !people[target].ids.contains(&id) {
                    people[target].ids.push(id);
                }
            }
            if !people[target].keys.contains(&line.key) {
                people[target].keys.push(line.key);
            }
        }
        Self::new(trust_domain, people, threshold)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The pinned admins.
    pub fn admins(&self) -> &[Person] {
        &self.admins
    }

    /// The pinned threshold M.
    pub fn threshold(&self) -> u32 {
        self.threshold
    }
}

/// A policy whose admin signatures were verified: the only form
/// [`check_release`](crate::check_release) and
/// [`check_admin_action`](crate::check_admin_action) take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPolicy {
    policy: Policy,
    document: String,
    digest: [u8; 32],
    signed_by: Vec<String>,
}

impl VerifiedPolicy {
    /// The exact document that was signed.
    pub fn document(&self) -> &str {
        &self.document
    }

    /// SHA-256 of the document.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// The admins whose signatures verified, each once, in order.
    pub fn signed_by(&self) -> &[String] {
        &self.signed_by
    }

    /// The parsed policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }
}

impl std::ops::Deref for VerifiedPolicy {
    type Target = Policy;
    fn deref(&self) -> &Policy {
        &self.policy
    }
}

impl fmt::Display for VerifiedPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "policy version {} (sha256 {}), signed by {}",
            self.policy.version,
            hex::encode(self.digest),
            self.signed_by.join(", ")
        )
    }
}

/// Verifies a new policy version: at least M valid signatures (under
/// `twokey-policy@<trust domain>`) by distinct admins of the `current`
/// version, or of the pinned `root` when there is none yet; every signature
/// presented must be valid and by one of those admins; two signatures by one
/// person count once; the version must be above the current one (no
/// rollback, no replay) and the trust domain the root's. On any error the
/// current version stays in force.
pub fn verify_policy_update<S: AsRef<[u8]>>(
    current: Option<&VerifiedPolicy>,
    root: &TrustRoot,
    document: &[u8],
    signatures: &[S],
) -> Result<VerifiedPolicy, PolicyError> {
    if document.len() > MAX_POLICY_BYTES {
        return Err(PolicyError::Parse(format!(
            "the document is larger than {MAX_POLICY_BYTES} bytes"
        )));
    }
    if signatures.len() > MAX_POLICY_SIGNATURES {
        return Err(PolicyError::Invalid(format!(
            "more than {MAX_POLICY_SIGNATURES} signatures"
        )));
    }
    // Who may sign this version.
    let (people, by_key, threshold, authority): (&[Person], Vec<(&String, usize)>, u32, String) =
        match current {
            Some(cur) => (
                &cur.policy.people,
                cur.policy
                    .by_key
                    .iter()
                    .filter(|(_, i)| cur.policy.admins.contains(i))
                    .map(|(k, &i)| (k, i))
                    .collect(),
                cur.policy.admin_threshold,
                format!("policy version {}", cur.policy.version),
            ),
            None => (
                &root.admins,
                root.by_key.iter().map(|(k, &i)| (k, i)).collect(),
                root.threshold,
                "the pinned admin set".to_string(),
            ),
        };
    let by_key: BTreeMap<&String, usize> = by_key.into_iter().collect();
    let namespace = policy_namespace(&root.trust_domain);
    let mut signed: BTreeSet<usize> = BTreeSet::new();
    for (n, sig) in signatures.iter().enumerate() {
        let index = n + 1;
        let sig = parse_signature(sig.as_ref())
            .map_err(|detail| PolicyError::MalformedSignature { index, detail })?;
        if sig.namespace() != namespace {
            return Err(PolicyError::WrongNamespace {
                index,
                expected: namespace,
                found: sig.namespace().to_string(),
            });
        }
        let fp = fingerprint(sig.public_key());
        let Some(&who) = by_key.get(&fp) else {
            return Err(PolicyError::UnknownSigner {
                index,
                fingerprint: fp,
                authority,
            });
        };
        let person = &people[who];
        let key = person
            .keys
            .iter()
            .find(|k| k.key_data() == sig.public_key())
            .ok_or_else(|| PolicyError::Invalid("key index out of step".into()))?;
        match verify(&sig, key, &namespace, document) {
            Ok(()) => {
                signed.insert(who);
            }
            Err(VerifyFailure::Namespace(found)) => {
                return Err(PolicyError::WrongNamespace {
                    index,
                    expected: namespace,
                    found,
                });
            }
            Err(VerifyFailure::Signature(detail)) => {
                return Err(PolicyError::BadSignature {
                    index,
                    person: person.name.clone(),
                    detail,
                });
            }
        }
    }
    let signed_by: Vec<String> = signed.iter().map(|&i| people[i].name.clone()).collect();
    if (signed.len() as u64) < u64::from(threshold) {
        return Err(PolicyError::TooFewSignatures {
            signed_by,
            need: threshold,
        });
    }
    let text = std::str::from_utf8(document)
        .map_err(|_| PolicyError::Parse("the document is not UTF-8".into()))?;
    let policy = Policy::parse(text)?;
    if policy.trust_domain != root.trust_domain {
        return Err(PolicyError::TrustDomain {
            expected: root.trust_domain.clone(),
            found: policy.trust_domain,
        });
    }
    let active = current.map_or(0, |c| c.policy.version);
    if policy.version <= active {
        return Err(PolicyError::NotNewer {
            proposed: policy.version,
            active,
        });
    }
    Ok(VerifiedPolicy {
        policy,
        document: text.to_string(),
        digest: Sha256::digest(document).into(),
        signed_by,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_holder_ids_are_every_id_of_each_holder() {
        let text = include_str!("../policy.example.toml").replace(
            "ids = [\"spiffe://twokey.local/user/olivia\"]",
            "ids = [\"spiffe://twokey.local/user/olivia\", \"spiffe://twokey.local/user/olivia-laptop\"]",
        );
        let p = Policy::parse(&text).unwrap();
        let account = "aws-prod-root";
        assert_eq!(
            p.role_holder_ids(account, Role::Operator),
            [
                "spiffe://twokey.local/user/olivia",
                "spiffe://twokey.local/user/olivia-laptop"
            ]
        );
        assert_eq!(
            p.role_holder_ids(account, Role::Approver),
            [
                "spiffe://twokey.local/user/adam",
                "spiffe://twokey.local/user/anna"
            ]
        );
        // No account: nobody, except the policy's admins.
        assert!(p.role_holder_ids("nope", Role::Requester).is_empty());
        assert_eq!(
            p.role_holder_ids("nope", Role::Admin).len(),
            p.admins().len()
        );
        let olivia = p
            .person_with_id("spiffe://twokey.local/user/olivia-laptop")
            .unwrap();
        assert_eq!(olivia.name(), "olivia");
        assert!(p.person_with_id("spiffe://twokey.local/user/zed").is_none());
    }

    fn with_account_lines(lines: &str) -> String {
        include_str!("../policy.example.toml").replace(
            "[accounts.aws-prod-root]\n",
            &format!("[accounts.aws-prod-root]\n{lines}\n"),
        )
    }

    fn invalid(text: &str) -> String {
        match Policy::parse(text) {
            Err(PolicyError::Invalid(message)) => message,
            other => panic!("expected an invalid policy, got {other:?}"),
        }
    }

    #[test]
    fn an_account_maps_its_aws_account_with_a_signin_window() {
        let p = Policy::parse(&with_account_lines(
            "aws_account_id = \"123456789012\"\nsignin_window = \"5m\"",
        ))
        .unwrap();
        let a = p.account("aws-prod-root").unwrap();
        assert_eq!(a.aws_account_id.as_deref(), Some("123456789012"));
        assert_eq!(a.signin_window, Duration::from_secs(300));
        assert_eq!(
            p.aws_accounts().collect::<Vec<_>>(),
            [("aws-prod-root", "123456789012", Duration::from_secs(300))]
        );
        // Not mapped: no id, the default window.
        let p = Policy::parse(include_str!("../policy.example.toml")).unwrap();
        let a = p.account("aws-prod-root").unwrap();
        assert_eq!(a.aws_account_id, None);
        assert_eq!(a.signin_window, DEFAULT_SIGNIN_WINDOW);
        let p = Policy::parse(&with_account_lines("aws_account_id = \"000000000001\"")).unwrap();
        assert_eq!(
            p.account("aws-prod-root").unwrap().signin_window,
            Duration::from_secs(600)
        );
    }

    #[test]
    fn an_aws_account_id_is_exactly_twelve_digits() {
        for bad in [
            "12345678901",
            "1234567890123",
            "12345678901a",
            " 123456789012",
            "",
        ] {
            let message = invalid(&with_account_lines(&format!("aws_account_id = {bad:?}")));
            assert!(
                message.contains("accounts.aws-prod-root.aws_account_id")
                    && message.contains("is not 12 digits"),
                "{bad:?}: {message}"
            );
        }
    }

    #[test]
    fn a_signin_window_is_one_minute_to_one_hour() {
        for ok in ["1m", "60s", "1h", "30m"] {
            Policy::parse(&with_account_lines(&format!("signin_window = {ok:?}"))).unwrap();
        }
        for bad in ["59s", "0s", "61m", "2h"] {
            let message = invalid(&with_account_lines(&format!("signin_window = {bad:?}")));
            assert!(
                message.contains("accounts.aws-prod-root.signin_window")
                    && message.contains("must be 1m to 1h"),
                "{bad:?}: {message}"
            );
        }
        let message = invalid(&with_account_lines("signin_window = \"soon\""));
        assert!(message.contains("signin_window"), "{message}");
    }

    #[test]
    fn two_accounts_cannot_map_the_same_aws_account() {
        let base = with_account_lines("aws_account_id = \"123456789012\"");
        let second = "\n[accounts.aws-dev-root]\nrequesters = [\"rita\"]\napprovers = [\"adam\"]\n\
                      operators = [\"olivia\"]\nadmins = [\"alice\", \"bob\", \"carol\"]\n";
        let ok = format!("{base}{second}aws_account_id = \"123456789013\"\n");
        let p = Policy::parse(&ok).unwrap();
        assert_eq!(
            p.account("aws-dev-root").unwrap().aws_account_id.as_deref(),
            Some("123456789013")
        );
        let message = invalid(&format!(
            "{base}{second}aws_account_id = \"123456789012\"\n"
        ));
        assert!(
            message.contains("accounts.aws-prod-root.aws_account_id 123456789012")
                && message.contains("accounts.aws-dev-root"),
            "{message}"
        );
    }
}
