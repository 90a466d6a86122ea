//! The policy: who may do what on which account. Read from TOML and
//! validated at start; an error names the file, the field and what is wrong.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::Duration,
};

use serde::Deserialize;
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
    slack: BTreeMap<String, String>,
    groups: BTreeMap<String, BTreeSet<String>>,
    accounts: BTreeMap<String, AccountPolicy>,
}

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
    6
}
fn default_pin_attempts() -> u32 {
    5
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
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            file: path.display().to_string(),
            field: "(file)".into(),
            problem: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates policy text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PolicyError> {
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
            if let Some(both) = intake.intersection(&approvers).next() {
                return Err(err(
                    &field("intake"),
                    format!(
                        "{both} is both an intake service and an approver; intake services never approve"
                    ),
                ));
            }
            if requesters.is_empty() && intake.is_empty() {
                return Err(err(
                    &field("requesters"),
                    "no one may file requests; name at least one group".into(),
                ));
            }
            if operators.is_empty() {
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
            if (approvers.len() as u64) < u64::from(a.approvals_required) {
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
        Ok(Self {
            identities,
            names,
            slack: raw.slack,
            groups,
            accounts,
        })
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
        self.slack.get(self.name_of(id)?).map(String::as_str)
    }

    /// Groups `id` belongs to.
    pub fn groups_of(&self, id: &SpiffeId) -> Vec<String> {
        let Some(name) = self.name_of(id) else {
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

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        assert!(parse_duration("1x").is_err());
        assert!(parse_duration("").is_err());
    }
}
