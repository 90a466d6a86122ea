//! The policy: who may do what on which account. Read from TOML and
//! validated at start; an error names the file, the field and what is wrong.
//! Once an admin-signed policy is in force, [`Policy::under_signed`] makes
//! the rules from it: roles and counts from the signed document; names,
//! Slack ids, groups and per-account PIN and delivery settings from here.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::Duration,
};

use serde::Deserialize;
use twokey_consent::{Policy as SignedDoc, Role as SignedRole};
use twokey_runtime::SpiffeId;

/// Why a policy was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("policy {file}: {field}: {problem}")]
pub struct PolicyError {
    /// The policy file.
    pub file: String,
    /// The field, e.g. `accounts.aws-prod-root.approvals_required`.
    pub field: String,
    /// What is wrong and what to do.
    pub problem: String,
}

/// Who receives the code of a verified request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// The operator releases the code and reads it out.
    #[default]
    Operator,
    /// The requester releases the code from their own CLI.
    Requester,
}

/// A role on an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Files requests.
    Requester,
    /// Approves or denies requests.
    Approver,
    /// Verifies PINs and releases codes.
    Operator,
    /// Enrolls and removes the account.
    Admin,
    /// A service that files requests on a requester's behalf.
    Intake,
}

impl Role {
    /// The role as a policy word.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Requester => "requester",
            Role::Approver => "approver",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Intake => "intake service",
        }
    }
}

/// The rules for one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountPolicy {
    /// The account id.
    pub id: String,
    /// Identities that may file requests.
    pub requesters: BTreeSet<SpiffeId>,
    /// Identities that may approve or deny.
    pub approvers: BTreeSet<SpiffeId>,
    /// Identities that may verify PINs and release codes.
    pub operators: BTreeSet<SpiffeId>,
    /// Identities that may enroll and remove the account.
    pub admins: BTreeSet<SpiffeId>,
    /// Services that may file on a requester's behalf; they never approve.
    pub intake: BTreeSet<SpiffeId>,
    /// Approvals a request needs.
    pub approvals_required: u32,
    /// How long a request may stay pending.
    pub request_ttl: Duration,
    /// How long an approved request may wait for release.
    pub release_window: Duration,
    /// Codes one request may release.
    pub codes_per_request: u32,
    /// Digits in a PIN.
    pub pin_length: u32,
    /// Wrong PINs that lock a request.
    pub pin_max_attempts: u32,
    /// Who gets the code.
    pub delivery: Delivery,
}

impl AccountPolicy {
    /// The roles `id` has on this account.
    pub fn roles_of(&self, id: &SpiffeId) -> Vec<Role> {
        [
            (Role::Requester, &self.requesters),
            (Role::Approver, &self.approvers),
            (Role::Operator, &self.operators),
            (Role::Admin, &self.admins),
            (Role::Intake, &self.intake),
        ]
        .into_iter()
        .filter(|(_, set)| set.contains(id))
        .map(|(role, _)| role)
        .collect()
    }

    /// Whether `id` has `role` on this account.
    pub fn has(&self, id: &SpiffeId, role: Role) -> bool {
        match role {
            Role::Requester => self.requesters.contains(id),
            Role::Approver => self.approvers.contains(id),
            Role::Operator => self.operators.contains(id),
            Role::Admin => self.admins.contains(id),
            Role::Intake => self.intake.contains(id),
        }
    }
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    identities: BTreeMap<String, SpiffeId>,
    names: BTreeMap<SpiffeId, String>,
    slack: BTreeMap<SpiffeId, String>,
    groups: BTreeMap<String, BTreeSet<String>>,
    accounts: BTreeMap<String, AccountPolicy>,
    /// Accounts whose section names no roles: settings only (allowed when
    /// roles come from a signed policy).
    settings_only: BTreeSet<String>,
    /// The signed policy version the roles and counts come from; none for
    /// the TOML file alone.
    signed_version: Option<u64>,
}

/// Where the TOML file and the signed policy in force differ on one
/// account (the signed policy wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disagreement {
    /// The account.
    pub account: String,
    /// What differs.
    pub detail: String,
}

/// The effective rules' defaults for an account the TOML file has no
/// section for.
const DEFAULT_PIN_LENGTH: u32 = 6;
const DEFAULT_PIN_ATTEMPTS: u32 = 5;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    identities: BTreeMap<String, String>,
    #[serde(default)]
    slack: BTreeMap<String, String>,
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    accounts: BTreeMap<String, RawAccount>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    #[serde(default)]
    requesters: Vec<String>,
    #[serde(default)]
    approvers: Vec<String>,
    #[serde(default)]
    operators: Vec<String>,
    #[serde(default)]
    admins: Vec<String>,
    #[serde(default)]
    intake: Vec<String>,
    #[serde(default = "one")]
    approvals_required: u32,
    #[serde(default = "default_ttl")]
    request_ttl: String,
    #[serde(default = "default_window")]
    release_window: String,
    #[serde(default = "one")]
    codes_per_request: u32,
    #[serde(default = "default_pin_length")]
    pin_length: u32,
    #[serde(default = "default_pin_attempts")]
    pin_max_attempts: u32,
    #[serde(default)]
    delivery: Delivery,
}

fn one() -> u32 {
    1
}
fn default_ttl() -> String {
    "1h".into()
}
fn default_window() -> String {
    "15m".into()
}
fn default_pin_length() -> u32 {
    DEFAULT_PIN_LENGTH
}
fn default_pin_attempts() -> u32 {
    DEFAULT_PIN_ATTEMPTS
}

/// Whether `name` is a valid identity name: 1 to 64 characters of
/// `[a-z0-9._-]`, not starting with '.'. Names become file names (the
/// mailbox notifier's `<name>.jsonl`), so none holds a path separator or is
/// `.` or `..`.
pub fn valid_name(name: &str) -> bool {
    valid_account_id(name) && !name.starts_with('.')
}

/// Whether `id` is a valid account id: 1 to 64 characters of `[a-z0-9._-]`.
pub fn valid_account_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

/// Parses a duration such as `90s`, `15m`, `1h`, `1h30m` or `2d`.
pub use twokey_runtime::time::parse_duration;

impl Policy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        Self::load_with(path, false)
    }

    /// Reads and validates a policy file; with `roles_signed` (the broker
    /// has a `[consent]` root, so roles come from the signed policy once one
    /// is in force) an account section may name no roles at all and hold
    /// only its PIN and delivery settings.
    pub fn load_with(path: &Path, roles_signed: bool) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            file: path.display().to_string(),
            field: "(file)".into(),
            problem: format!("cannot read it: {e}"),
        })?;
        Self::parse_with(&text, path, roles_signed)
    }

    /// Parses and validates policy text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyError> {
        Self::parse_with(text, path, false)
    }

    /// [`Self::parse`]; with `roles_signed` an account section may name no
    /// roles (see [`Self::load_with`]).
    pub fn parse_with(text: &str, path: &Path, roles_signed: bool) -> Result<Self, PolicyError> {
        let file = path.display().to_string();
        let err = |field: &str, problem: String| PolicyError {
            file: file.clone(),
            field: field.to_owned(),
            problem,
        };
        let raw: RawPolicy = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            err(
                &line.map_or("(syntax)".into(), |l| format!("line {l}")),
                e.message().to_owned(),
            )
        })?;

        let mut identities = BTreeMap::new();
        let mut names = BTreeMap::new();
        for (name, id) in &raw.identities {
            let field = format!("identities.{name}");
            if !valid_name(name) {
                return Err(err(
                    &field,
                    "an identity name is 1 to 64 characters of a-z, 0-9, '.', '_', '-', not starting with '.'; rename it".into(),
                ));
            }
            let id = SpiffeId::parse(id).map_err(|e| err(&field, e.to_string()))?;
            if let Some(other) = names.insert(id.clone(), name.clone()) {
                return Err(err(
                    &field,
                    format!("{id} is also named {other:?}; give each identity one name"),
                ));
            }
            identities.insert(name.clone(), id);
        }
        for name in raw.slack.keys() {
            if !identities.contains_key(name) {
                return Err(err(
                    &format!("slack.{name}"),
                    format!("{name:?} is not in [identities]; add it there first"),
                ));
            }
        }
        let mut groups = BTreeMap::new();
        for (group, members) in &raw.groups {
            let field = format!("groups.{group}");
            if identities.contains_key(group) {
                return Err(err(
                    &field,
                    format!("{group:?} names both a group and an identity; rename one"),
                ));
            }
            let mut set = BTreeSet::new();
            for member in members {
                if !identities.contains_key(member) {
                    return Err(err(
                        &field,
                        format!(
                            "member {member:?} is not in [identities]; add it there or remove it"
                        ),
                    ));
                }
                set.insert(member.clone());
            }
            groups.insert(group.clone(), set);
        }

        let mut accounts = BTreeMap::new();
        let mut settings_only = BTreeSet::new();
        for (account, a) in raw.accounts {
            let field = |f: &str| format!("accounts.{account}.{f}");
            if !valid_account_id(&account) {
                return Err(err(
                    &format!("accounts.{account}"),
                    "account ids are 1 to 64 characters of a-z, 0-9, '.', '_' and '-'".into(),
                ));
            }
            let resolve = |f: &str, list: &[String]| -> Result<BTreeSet<SpiffeId>, PolicyError> {
                let mut out = BTreeSet::new();
                for entry in list {
                    if let Some(members) = groups.get(entry) {
                        out.extend(members.iter().map(|m| identities[m].clone()));
                    } else if let Some(id) = identities.get(entry) {
                        out.insert(id.clone());
                    } else {
                        return Err(err(
                            &field(f),
                            format!(
                                "{entry:?} is neither a group nor an identity; define it in [groups] or [identities]"
                            ),
                        ));
                    }
                }
                Ok(out)
            };
            let requesters = resolve("requesters", &a.requesters)?;
            let approvers = resolve("approvers", &a.approvers)?;
            let operators = resolve("operators", &a.operators)?;
            let admins = resolve("admins", &a.admins)?;
            let mut intake = BTreeSet::new();
            for entry in &a.intake {
                let id = identities.get(entry).ok_or_else(|| {
                    err(
                        &field("intake"),
                        format!(
                            "{entry:?} is not in [identities]; intake lists identities, not groups"
                        ),
                    )
                })?;
                intake.insert(id.clone());
            }
            let no_roles = [&requesters, &approvers, &operators, &admins, &intake]
                .iter()
                .all(|set| set.is_empty());
            let roles_here = !(roles_signed && no_roles);
            if !roles_here {
                settings_only.insert(account.clone());
            }
            if let Some(both) = intake.intersection(&approvers).next() {
                return Err(err(
                    &field("intake"),
                    format!(
                        "{both} is both an intake service and an approver; intake services never approve"
                    ),
                ));
            }
            if roles_here && requesters.is_empty() && intake.is_empty() {
                return Err(err(
                    &field("requesters"),
                    "no one may file requests; name at least one group".into(),
                ));
            }
            if roles_here && operators.is_empty() {
                return Err(err(
                    &field("operators"),
                    "no one may verify PINs; name at least one group".into(),
                ));
            }
            if a.approvals_required < 1 || a.approvals_required > 10 {
                return Err(err(
                    &field("approvals_required"),
                    format!("{} is out of range; use 1 to 10", a.approvals_required),
                ));
            }
            if roles_here && (approvers.len() as u64) < u64::from(a.approvals_required) {
                return Err(err(
                    &field("approvals_required"),
                    format!(
                        "{} approvals are required but the approver groups hold only {} identities",
                        a.approvals_required,
                        approvers.len()
                    ),
                ));
            }
            let request_ttl =
                parse_duration(&a.request_ttl).map_err(|p| err(&field("request_ttl"), p))?;
            let release_window =
                parse_duration(&a.release_window).map_err(|p| err(&field("release_window"), p))?;
            for (f, d) in [
                ("request_ttl", request_ttl),
                ("release_window", release_window),
            ] {
                if d.is_zero() || d > Duration::from_secs(7 * 86_400) {
                    return Err(err(&field(f), "must be more than 0s and at most 7d".into()));
                }
            }
            if !(1..=10).contains(&a.codes_per_request) {
                return Err(err(
                    &field("codes_per_request"),
                    format!("{} is out of range; use 1 to 10", a.codes_per_request),
                ));
            }
            if !(4..=12).contains(&a.pin_length) {
                return Err(err(
                    &field("pin_length"),
                    format!("{} is out of range; use 4 to 12 digits", a.pin_length),
                ));
            }
            if !(1..=20).contains(&a.pin_max_attempts) {
                return Err(err(
                    &field("pin_max_attempts"),
                    format!("{} is out of range; use 1 to 20", a.pin_max_attempts),
                ));
            }
            accounts.insert(
                account.clone(),
                AccountPolicy {
                    id: account.clone(),
                    requesters,
                    approvers,
                    operators,
                    admins,
                    intake,
                    approvals_required: a.approvals_required,
                    request_ttl,
                    release_window,
                    codes_per_request: a.codes_per_request,
                    pin_length: a.pin_length,
                    pin_max_attempts: a.pin_max_attempts,
                    delivery: a.delivery,
                },
            );
        }
        let slack = raw
            .slack
            .into_iter()
            .map(|(name, member)| (identities[&name].clone(), member))
            .collect();
        Ok(Self {
            identities,
            names,
            slack,
            groups,
            accounts,
            settings_only,
            signed_version: None,
        })
    }

    /// The rules in force under the signed policy `signed`: its accounts
    /// only, each with the holders of each role (every SPIFFE ID of each
    /// person it names), approvals, codes per request and windows from it;
    /// PIN length, PIN attempts and delivery from this file's section for
    /// the account (defaults without one). Names and Slack ids stay this
    /// file's; an ID it does not name takes its person's name from `signed`
    /// (and the Slack id of another of that person's IDs this file names).
    /// Answers where this file's roles and counts differ from `signed`'s.
    pub fn under_signed(&self, signed: &SignedDoc) -> (Self, Vec<Disagreement>) {
        let mut names = self.names.clone();
        let mut identities = self.identities.clone();
        let mut slack = self.slack.clone();
        for person in signed.people() {
            let ids: Vec<SpiffeId> = person
                .ids()
                .iter()
                .filter_map(|id| SpiffeId::parse(id).ok())
                .collect();
            let member = ids.iter().find_map(|id| self.slack.get(id)).cloned();
            for id in &ids {
                names
                    .entry(id.clone())
                    .or_insert_with(|| person.name().to_owned());
                if let Some(member) = &member {
                    slack.entry(id.clone()).or_insert_with(|| member.clone());
                }
            }
            if let Some(first) = ids.first() {
                identities
                    .entry(person.name().to_owned())
                    .or_insert_with(|| first.clone());
            }
        }
        let ids_of = |account: &str, role: SignedRole| -> BTreeSet<SpiffeId> {
            signed
                .role_holder_ids(account, role)
                .into_iter()
                .filter_map(|id| SpiffeId::parse(id).ok())
                .collect()
        };
        let mut accounts = BTreeMap::new();
        let mut differ = Vec::new();
        for id in signed.account_ids() {
            let Some(rules) = signed.account(id) else {
                continue;
            };
            let here = self.accounts.get(id);
            let account = AccountPolicy {
                id: id.to_owned(),
                requesters: ids_of(id, SignedRole::Requester),
                approvers: ids_of(id, SignedRole::Approver),
                operators: ids_of(id, SignedRole::Operator),
                admins: ids_of(id, SignedRole::Admin),
                intake: ids_of(id, SignedRole::Intake),
                approvals_required: rules.approvals_required,
                request_ttl: rules.request_window,
                release_window: rules.release_window,
                codes_per_request: rules.codes_per_request,
                pin_length: here.map_or(DEFAULT_PIN_LENGTH, |a| a.pin_length),
                pin_max_attempts: here.map_or(DEFAULT_PIN_ATTEMPTS, |a| a.pin_max_attempts),
                delivery: here.map_or_else(Delivery::default, |a| a.delivery),
            };
            if let Some(here) = here.filter(|_| !self.settings_only.contains(id)) {
                let detail = differences(here, &account);
                if !detail.is_empty() {
                    differ.push(Disagreement {
                        account: id.to_owned(),
                        detail: detail.join("; "),
                    });
                }
            }
            accounts.insert(id.to_owned(), account);
        }
        for id in self.accounts.keys() {
            if !accounts.contains_key(id) && !self.settings_only.contains(id) {
                differ.push(Disagreement {
                    account: id.clone(),
                    detail: "the signed policy does not name it, so it takes no requests".into(),
                });
            }
        }
        let policy = Self {
            identities,
            names,
            slack,
            groups: self.groups.clone(),
            accounts,
            settings_only: BTreeSet::new(),
            signed_version: Some(signed.version()),
        };
        (policy, differ)
    }

    /// The signed policy version the rules come from, if one is in force.
    pub fn signed_version(&self) -> Option<u64> {
        self.signed_version
    }

    /// What names the accounts, for messages: "the policy", or the signed
    /// policy version and how to see it.
    pub fn source(&self) -> String {
        match self.signed_version {
            None => "the policy".into(),
            Some(v) => format!("signed policy version {v} (`twokey policy show`)"),
        }
    }

    /// Checks that every identity is in `trust_domain`.
    pub fn check_trust_domain(&self, trust_domain: &str, path: &Path) -> Result<(), PolicyError> {
        for (name, id) in &self.identities {
            if id.trust_domain() != trust_domain {
                return Err(PolicyError {
                    file: path.display().to_string(),
                    field: format!("identities.{name}"),
                    problem: format!("{id} is not in the broker's trust domain {trust_domain}"),
                });
            }
        }
        Ok(())
    }

    /// One account's rules.
    pub fn account(&self, id: &str) -> Option<&AccountPolicy> {
        self.accounts.get(id)
    }

    /// Every account.
    pub fn accounts(&self) -> impl Iterator<Item = &AccountPolicy> {
        self.accounts.values()
    }

    /// The policy name of an identity.
    pub fn name_of(&self, id: &SpiffeId) -> Option<&str> {
        self.names.get(id).map(String::as_str)
    }

    /// An identity by policy name or SPIFFE ID.
    pub fn resolve(&self, name_or_id: &str) -> Option<SpiffeId> {
        if let Some(id) = self.identities.get(name_or_id) {
            return Some(id.clone());
        }
        SpiffeId::parse(name_or_id)
            .ok()
            .filter(|id| self.names.contains_key(id))
    }

    /// The Slack member id of an identity, if the policy names one.
    pub fn slack_member(&self, id: &SpiffeId) -> Option<&str> {
        self.slack.get(id).map(String::as_str)
    }

    /// Groups `id` belongs to.
    pub fn groups_of(&self, id: &SpiffeId) -> Vec<String> {
        // Groups hold the names of the file's own identities.
        let Some(name) = self
            .name_of(id)
            .filter(|name| self.identities.get(*name) == Some(id))
        else {
            return Vec::new();
        };
        self.groups
            .iter()
            .filter(|(_, m)| m.contains(name))
            .map(|(g, _)| g.clone())
            .collect()
    }

    /// The account ids, comma-separated, for messages.
    pub fn describe_accounts(&self) -> String {
        self.accounts.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// The roles and counts where `toml` and `signed` differ, for a warning.
fn differences(toml: &AccountPolicy, signed: &AccountPolicy) -> Vec<String> {
    let mut out = Vec::new();
    for (role, a, b) in [
        ("requesters", &toml.requesters, &signed.requesters),
        ("approvers", &toml.approvers, &signed.approvers),
        ("operators", &toml.operators, &signed.operators),
        ("admins", &toml.admins, &signed.admins),
        ("intake", &toml.intake, &signed.intake),
    ] {
        if a != b {
            let only = |x: &BTreeSet<SpiffeId>, y: &BTreeSet<SpiffeId>| {
                x.difference(y)
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            out.push(format!(
                "{role}: only in the file [{}], only in the signed policy [{}]",
                only(a, b),
                only(b, a)
            ));
        }
    }
    let secs = |d: Duration| format!("{}s", d.as_secs());
    for (field, a, b) in [
        (
            "approvals_required",
            toml.approvals_required.to_string(),
            signed.approvals_required.to_string(),
        ),
        (
            "codes_per_request",
            toml.codes_per_request.to_string(),
            signed.codes_per_request.to_string(),
        ),
        (
            "request_ttl (signed: request_window)",
            secs(toml.request_ttl),
            secs(signed.request_ttl),
        ),
        (
            "release_window",
            secs(toml.release_window),
            secs(signed.release_window),
        ),
    ] {
        if a != b {
            out.push(format!("{field}: {a} in the file, {b} signed"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[identities]
alice = "spiffe://t.local/user/alice"
bob = "spiffe://t.local/user/bob"
olivia = "spiffe://t.local/user/olivia"
bpm = "spiffe://t.local/svc/bpm"
[slack]
alice = "U1"
[groups]
requesters = ["alice"]
approvers = ["bob"]
operators = ["olivia"]
[accounts.aws-prod-root]
requesters = ["requesters"]
approvers = ["approvers"]
operators = ["operators"]
admins = ["bob"]
intake = ["bpm"]
release_window = "15m"
delivery = "requester"
"#;

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(text, Path::new("/etc/twokey/policy.toml"))
    }

    #[test]
    fn a_valid_policy_resolves_groups_to_identities_with_defaults() {
        let p = parse(GOOD).unwrap();
        let a = p.account("aws-prod-root").unwrap();
        let alice = p.resolve("alice").unwrap();
        assert_eq!(a.roles_of(&alice), vec![Role::Requester]);
        assert_eq!(a.approvals_required, 1);
        assert_eq!(a.request_ttl, Duration::from_secs(3600));
        assert_eq!(a.release_window, Duration::from_secs(900));
        assert_eq!(a.pin_length, 6);
        assert_eq!(a.pin_max_attempts, 5);
        assert_eq!(a.delivery, Delivery::Requester);
        assert_eq!(p.slack_member(&alice), Some("U1"));
        assert_eq!(p.resolve("spiffe://t.local/user/bob"), p.resolve("bob"));
        assert_eq!(p.groups_of(&alice), vec!["requesters".to_owned()]);
    }

    #[test]
    fn identity_names_that_could_leave_a_directory_are_refused() {
        for hostile in [
            "\"../alice\"",
            "\"..\"",
            "\".alice\"",
            "\"a/b\"",
            "\"/etc/x\"",
            "\"a\\\\b\"",
            "\"Alice\"",
            "\"al ice\"",
        ] {
            let text = GOOD.replace(
                "olivia = \"spiffe://t.local/user/olivia\"",
                &format!("olivia = \"spiffe://t.local/user/olivia\"\n{hostile} = \"spiffe://t.local/user/zed\""),
            );
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains("identities."), "{hostile}: {e}");
            assert!(e.contains("not starting with '.'"), "{hostile}: {e}");
        }
        for fine in ["a.b", "a-b_9", "x"] {
            assert!(valid_name(fine), "{fine}");
        }
    }

    #[test]
    fn errors_name_the_file_the_field_and_the_problem() {
        let cases = [
            (
                GOOD.replace("delivery = \"requester\"", "approvals_required = 2"),
                "accounts.aws-prod-root.approvals_required",
                "only 1",
            ),
            (
                GOOD.replace("\"15m\"", "\"15\""),
                "accounts.aws-prod-root.release_window",
                "lacks a unit",
            ),
            (
                GOOD.replace("approvers = [\"bob\"]", "approvers = [\"bob\", \"zed\"]"),
                "groups.approvers",
                "zed",
            ),
            (
                GOOD.replace("intake = [\"bpm\"]", "intake = [\"bpm\"]\npin_length = 3"),
                "accounts.aws-prod-root.pin_length",
                "4 to 12",
            ),
            (
                GOOD.replace("spiffe://t.local/user/bob", "https://bob"),
                "identities.bob",
                "spiffe://",
            ),
            (
                GOOD.replace("admins = [\"bob\"]", "admins = [\"nobody\"]"),
                "accounts.aws-prod-root.admins",
                "nobody",
            ),
            (
                GOOD.replace(
                    "approvers = [\"approvers\"]",
                    "approvers = [\"approvers\", \"bpm\"]",
                ),
                "accounts.aws-prod-root.intake",
                "never approve",
            ),
            (
                GOOD.replace("[slack]\nalice", "[slack]\nzed"),
                "slack.zed",
                "[identities]",
            ),
            (
                GOOD.replace("delivery = \"requester\"", "deliver = \"requester\""),
                "line",
                "unknown field",
            ),
        ];
        for (text, field, problem) in cases {
            let e = parse(&text).unwrap_err();
            let shown = e.to_string();
            assert!(
                shown.starts_with("policy /etc/twokey/policy.toml: "),
                "{shown}"
            );
            assert!(e.field.starts_with(field), "{field} not in {shown}");
            assert!(shown.contains(problem), "{problem} not in {shown}");
        }
    }

    #[test]
    fn the_example_policy_is_valid() {
        let text = include_str!("../../deploy/policy.example.toml");
        let p = parse(text).unwrap();
        p.check_trust_domain("twokey.local", Path::new("policy.example.toml"))
            .unwrap();
        let a = p.account("aws-prod-root").unwrap();
        assert!(a.has(&p.resolve("bpm").unwrap(), Role::Intake));
        assert!(p.check_trust_domain("other.org", Path::new("p")).is_err());
    }

    /// The consent crate's example signed policy: rita requests, adam and
    /// anna approve (2 needed), olivia operates, alice, bob and carol are
    /// the account's admins, bpm files on behalf.
    fn signed_example() -> SignedDoc {
        SignedDoc::parse(include_str!("../../consent/policy.example.toml")).unwrap()
    }

    fn id(name: &str) -> SpiffeId {
        let kind = if name == "bpm" { "svc" } else { "user" };
        SpiffeId::parse(&format!("spiffe://twokey.local/{kind}/{name}")).unwrap()
    }

    #[test]
    fn under_a_signed_policy_roles_and_counts_are_signed_and_settings_stay() {
        let file = GOOD.replace("t.local", "twokey.local").replace(
            "[accounts.aws-prod-root]",
            "[accounts.old-root]\nrequesters = [\"alice\"]\napprovers = [\"bob\"]\noperators = [\"olivia\"]\n\n[accounts.aws-prod-root]",
        );
        let file = parse(&file).unwrap();
        let (p, differ) = file.under_signed(&signed_example());
        assert_eq!(p.signed_version(), Some(1));
        assert!(
            p.source().contains("signed policy version 1"),
            "{}",
            p.source()
        );
        assert!(p.account("old-root").is_none());
        let a = p.account("aws-prod-root").unwrap();
        assert_eq!(a.requesters, BTreeSet::from([id("rita")]));
        assert_eq!(a.approvers, BTreeSet::from([id("adam"), id("anna")]));
        assert_eq!(a.operators, BTreeSet::from([id("olivia")]));
        assert_eq!(
            a.admins,
            BTreeSet::from([id("alice"), id("bob"), id("carol")])
        );
        assert_eq!(a.intake, BTreeSet::from([id("bpm")]));
        assert_eq!(a.approvals_required, 2);
        assert_eq!(a.codes_per_request, 1);
        assert_eq!(a.request_ttl, Duration::from_secs(3600));
        assert_eq!(a.release_window, Duration::from_secs(900));
        // The file's settings for the account stay.
        assert_eq!(a.delivery, Delivery::Requester);
        assert_eq!(a.pin_length, 6);
        // bob approves in the file, not in the signed policy.
        assert!(!a.has(&id("bob"), Role::Approver));
        assert_eq!(a.roles_of(&id("rita")), vec![Role::Requester]);
        // Names: the file's, else the signed person's; Slack ids the file's.
        assert_eq!(p.name_of(&id("alice")), Some("alice"));
        assert_eq!(p.name_of(&id("rita")), Some("rita"));
        assert_eq!(p.resolve("rita"), Some(id("rita")));
        assert_eq!(p.slack_member(&id("alice")), Some("U1"));
        assert_eq!(p.slack_member(&id("rita")), None);
        assert_eq!(p.groups_of(&id("rita")), Vec::<String>::new());
        // One disagreement per account, naming what differs.
        let accounts: Vec<&str> = differ.iter().map(|d| d.account.as_str()).collect();
        assert_eq!(accounts, ["aws-prod-root", "old-root"]);
        let prod = &differ[0].detail;
        for part in [
            "requesters: only in the file [spiffe://twokey.local/user/alice], only in the signed policy [spiffe://twokey.local/user/rita]",
            "approvals_required: 1 in the file, 2 signed",
        ] {
            assert!(prod.contains(part), "{part} not in {prod}");
        }
        assert!(!prod.contains("operators"), "{prod}");
        assert!(differ[1].detail.contains("takes no requests"));
    }

    #[test]
    fn a_signed_account_without_a_section_takes_defaults_and_ids_of_one_person_share_a_slack_id() {
        let signed = include_str!("../../consent/policy.example.toml")
            .replace(
                "ids = [\"spiffe://twokey.local/user/alice\"]",
                "ids = [\"spiffe://twokey.local/user/alice\", \"spiffe://twokey.local/user/alice2\"]",
            )
            .replace("[accounts.aws-prod-root]", "[accounts.gcp-root]");
        let signed = SignedDoc::parse(&signed).unwrap();
        let file = parse(&GOOD.replace("t.local", "twokey.local")).unwrap();
        let (p, differ) = file.under_signed(&signed);
        let a = p.account("gcp-root").unwrap();
        assert_eq!(
            (a.pin_length, a.pin_max_attempts, a.delivery),
            (6, 5, Delivery::Operator)
        );
        assert!(a.has(&id("alice2"), Role::Admin));
        assert_eq!(p.name_of(&id("alice2")), Some("alice"));
        assert_eq!(p.slack_member(&id("alice2")), Some("U1"));
        // The file's account is not in the signed policy.
        assert_eq!(differ.len(), 1);
        assert_eq!(differ[0].account, "aws-prod-root");
    }

    #[test]
    fn an_account_section_without_roles_is_settings_only_when_roles_are_signed() {
        let text = "[accounts.aws-prod-root]\npin_length = 8\ndelivery = \"requester\"\n";
        let e = parse(text).unwrap_err();
        assert!(e.to_string().contains("no one may file requests"), "{e}");
        let file = Policy::parse_with(text, Path::new("p.toml"), true).unwrap();
        assert!(file.account("aws-prod-root").unwrap().requesters.is_empty());
        let (p, differ) = file.under_signed(&signed_example());
        assert!(differ.is_empty(), "{differ:?}");
        let a = p.account("aws-prod-root").unwrap();
        assert_eq!((a.pin_length, a.delivery), (8, Delivery::Requester));
        assert_eq!(a.approvals_required, 2);
        // Some roles but not all is still checked.
        let e = Policy::parse_with(
            "[identities]\nbob = \"spiffe://t.local/user/bob\"\n[accounts.x]\napprovers = [\"bob\"]\n",
            Path::new("p.toml"),
            true,
        )
        .unwrap_err();
        assert!(e.to_string().contains("no one may file requests"), "{e}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        assert!(parse_duration("1x").is_err());
        assert!(parse_duration("").is_err());
    }
}
