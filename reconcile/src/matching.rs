//! Root sign-ins and MFA device changes of mapped accounts against the codes
//! twokey released, as findings.
//!
//! # The window
//!
//! Times compare in whole seconds, CloudTrail's resolution: a release time is
//! cut to its second (12:00:00.7 is 12:00:00) before comparing. With `S` a
//! sign-in's `eventTime`, `R` a release time so cut and `w` the account's
//! window, the release can explain the sign-in when
//!
//! ```text
//!     S - w  <=  R  <=  S          (both ends inclusive)
//! ```
//!
//! so a release exactly `w` before the sign-in, or in the same second, counts;
//! one `w` + 1 s before, or one second after, does not.
//!
//! # One release, one sign-in
//!
//! Each account's successful MFA sign-ins are taken in time order (then by
//! `eventID`); each takes the earliest release of its account that is in its
//! window and not yet taken. So a release explains at most one sign-in: the
//! first one after it that an earlier release did not already explain. (For
//! windows of one length this greedy choice explains as many sign-ins as any
//! assignment can.) Failed sign-ins and sign-ins without MFA take no release.
//!
//! # Unused and pending
//!
//! A release no sign-in took is **unused** once its window has closed in the
//! records: `R + w <= complete_until`, where the caller vouches that every
//! sign-in up to and including `complete_until` is among the events (CloudTrail
//! delivers log files some minutes late: pass, say, now minus 15 minutes).
//! Otherwise it is **pending**, returned for the next run.
//!
//! The same `eventID` twice (a record delivered by both a file and
//! EventBridge, or by two trails) counts once.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use time::OffsetDateTime;

use crate::cloudtrail::{Event, MfaDeviceChange, SignIn, SignInOutcome};

/// The window of an account that does not set its own.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10 * 60);

/// An AWS account id mapped to a twokey account, with its window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// The twokey account id.
    pub account: String,
    /// How long before a sign-in a release may be and still explain it.
    pub window: Duration,
}

/// Which AWS accounts are reconciled, and as which twokey accounts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accounts {
    by_aws: BTreeMap<String, Mapped>,
}

/// A mapping that cannot be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// Not 12 digits.
    #[error("aws_account_id {0:?} is not 12 digits: write the id AWS shows, e.g. \"123456789012\"")]
    NotAnAccountId(String),
    /// Two twokey accounts name the same AWS account.
    #[error(
        "aws_account_id {aws} is named by both {first} and {second}: one AWS account has one root user, map it once"
    )]
    Duplicate {
        /// The AWS account id.
        aws: String,
        /// The account mapped first.
        first: String,
        /// The account mapped again.
        second: String,
    },
    /// One twokey account names two AWS accounts.
    #[error(
        "account {account} is mapped to both {first} and {second}: a twokey account holds the seed of one root user"
    )]
    AccountTwice {
        /// The twokey account.
        account: String,
        /// The AWS account mapped first.
        first: String,
        /// The AWS account mapped again.
        second: String,
    },
    /// A window of zero would explain nothing.
    #[error("the window of {0} is zero: give it at least a few minutes")]
    ZeroWindow(String),
    /// An entry of the `aws_accounts` attribute that is not
    /// `account=aws_account_id/window_secs`.
    #[error(
        "aws_accounts entry {0:?} is not account=aws_account_id/window_secs: the vault's policy.applied event writes it so"
    )]
    BadEntry(String),
}

impl Accounts {
    /// No account mapped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `aws_account_id` to the twokey `account`, with `window` or
    /// [`DEFAULT_WINDOW`].
    pub fn map(
        &mut self,
        aws_account_id: &str,
        account: &str,
        window: Option<Duration>,
    ) -> Result<(), MappingError> {
        if !crate::cloudtrail::is_account_id(aws_account_id) {
            return Err(MappingError::NotAnAccountId(aws_account_id.to_owned()));
        }
        let window = window.unwrap_or(DEFAULT_WINDOW);
        if window.is_zero() {
            return Err(MappingError::ZeroWindow(account.to_owned()));
        }
        if let Some((first, _)) = self.by_aws.iter().find(|(_, m)| m.account == account) {
            return Err(MappingError::AccountTwice {
                account: account.to_owned(),
                first: first.clone(),
                second: aws_account_id.to_owned(),
            });
        }
        if let Some(first) = self.by_aws.get(aws_account_id) {
            return Err(MappingError::Duplicate {
                aws: aws_account_id.to_owned(),
                first: first.account.clone(),
                second: account.to_owned(),
            });
        }
        self.by_aws.insert(
            aws_account_id.to_owned(),
            Mapped {
                account: account.to_owned(),
                window,
            },
        );
        Ok(())
    }

    /// The mapping a vault's `policy.applied` event names in its
    /// `aws_accounts` attribute: `account=aws_account_id/window_secs`,
    /// comma-separated; empty maps nothing.
    pub fn from_policy_attr(attr: &str) -> Result<Self, MappingError> {
        let mut accounts = Self::new();
        for entry in attr.split(',').filter(|e| !e.is_empty()) {
            let bad = || MappingError::BadEntry(entry.to_owned());
            let (account, rest) = entry.split_once('=').ok_or_else(bad)?;
            let (aws, secs) = rest.split_once('/').ok_or_else(bad)?;
            let secs: u64 = secs.parse().map_err(|_| bad())?;
            if account.is_empty() {
                return Err(bad());
            }
            accounts.map(aws, account, Some(Duration::from_secs(secs)))?;
        }
        Ok(accounts)
    }

    /// Whether no account is mapped.
    pub fn is_empty(&self) -> bool {
        self.by_aws.is_empty()
    }

    /// Each mapping: AWS account id and what it maps to, in AWS id order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Mapped)> {
        self.by_aws.iter().map(|(aws, m)| (aws.as_str(), m))
    }

    /// The mapping of an AWS account id.
    pub fn get(&self, aws_account_id: &str) -> Option<&Mapped> {
        self.by_aws.get(aws_account_id)
    }

    /// Each mapped twokey account's window.
    fn windows(&self) -> BTreeMap<&str, Duration> {
        self.by_aws
            .values()
            .map(|m| (m.account.as_str(), m.window))
            .collect()
    }
}

/// A code the vault released, from a `code.released` audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// The twokey account id.
    pub account: String,
    /// When the vault released it.
    pub at: OffsetDateTime,
    /// What names it in the audit log (leaf index, request id), carried into
    /// the findings.
    pub id: String,
}

/// What reconciliation says about one sign-in, change or release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A root sign-in with MFA that a release explains.
    Matched {
        /// The twokey account.
        account: String,
        /// The sign-in.
        sign_in: SignIn,
        /// The release that explains it.
        release: Release,
    },
    /// A root sign-in with MFA and no release in its window: the code came
    /// from somewhere else.
    Unexplained {
        /// The twokey account.
        account: String,
        /// The sign-in.
        sign_in: SignIn,
    },
    /// A successful root sign-in without MFA.
    Unprotected {
        /// The twokey account.
        account: String,
        /// The sign-in.
        sign_in: SignIn,
    },
    /// A failed root sign-in.
    Failed {
        /// The twokey account.
        account: String,
        /// The sign-in.
        sign_in: SignIn,
    },
    /// An MFA device created, enabled, deactivated or deleted on a mapped
    /// account, by any identity, succeeded or not: not through twokey.
    OutOfBand {
        /// The twokey account.
        account: String,
        /// The change.
        change: MfaDeviceChange,
    },
    /// A release that no sign-in took within its window.
    Unused {
        /// The release.
        release: Release,
    },
}

/// The kind of a [`Finding`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FindingKind {
    /// [`Finding::Matched`].
    Matched,
    /// [`Finding::Unexplained`].
    Unexplained,
    /// [`Finding::Unprotected`].
    Unprotected,
    /// [`Finding::Failed`].
    Failed,
    /// [`Finding::OutOfBand`].
    OutOfBand,
    /// [`Finding::Unused`].
    Unused,
}

impl FindingKind {
    /// A short stable name, for event types and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Matched => "matched",
            Self::Unexplained => "unexplained",
            Self::Unprotected => "unprotected",
            Self::Failed => "failed",
            Self::OutOfBand => "out_of_band",
            Self::Unused => "unused",
        }
    }

    /// Whether the account's admins should be told at once (issue 20:
    /// unexplained, unprotected and out-of-band).
    pub fn alerts(self) -> bool {
        matches!(
            self,
            Self::Unexplained | Self::Unprotected | Self::OutOfBand
        )
    }
}

impl Finding {
    /// Its kind.
    pub fn kind(&self) -> FindingKind {
        match self {
            Self::Matched { .. } => FindingKind::Matched,
            Self::Unexplained { .. } => FindingKind::Unexplained,
            Self::Unprotected { .. } => FindingKind::Unprotected,
            Self::Failed { .. } => FindingKind::Failed,
            Self::OutOfBand { .. } => FindingKind::OutOfBand,
            Self::Unused { .. } => FindingKind::Unused,
        }
    }

    /// The twokey account it is about.
    pub fn account(&self) -> &str {
        match self {
            Self::Matched { account, .. }
            | Self::Unexplained { account, .. }
            | Self::Unprotected { account, .. }
            | Self::Failed { account, .. }
            | Self::OutOfBand { account, .. } => account,
            Self::Unused { release } => &release.account,
        }
    }

    /// When it happened: the sign-in's or change's `eventTime`, the release's
    /// time for an unused release.
    pub fn time(&self) -> OffsetDateTime {
        match self {
            Self::Matched { sign_in, .. }
            | Self::Unexplained { sign_in, .. }
            | Self::Unprotected { sign_in, .. }
            | Self::Failed { sign_in, .. } => sign_in.time,
            Self::OutOfBand { change, .. } => change.time,
            Self::Unused { release } => release.at,
        }
    }
}

/// Records that are no finding, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ignored {
    /// Events whose `eventID` came earlier in the input.
    pub duplicate_events: u64,
    /// Events of AWS accounts not mapped.
    pub unmapped_events: u64,
    /// Sign-ins to mapped accounts by identities other than root.
    pub non_root_sign_ins: u64,
    /// Releases of twokey accounts that name no AWS account.
    pub unmapped_releases: u64,
}

/// The outcome of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciliation {
    /// The findings, by time (then account, kind).
    pub findings: Vec<Finding>,
    /// Releases neither taken nor yet unused: their window is still open at
    /// `complete_until`. Pass them in again next run.
    pub pending: Vec<Release>,
    /// What was left out.
    pub ignored: Ignored,
}

impl Reconciliation {
    /// How many findings are of `kind`.
    pub fn count(&self, kind: FindingKind) -> usize {
        self.findings.iter().filter(|f| f.kind() == kind).count()
    }
}

/// A time cut to its whole second.
fn second(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

/// Reconciles `events` with `releases` for the `accounts` mapped (see the
/// module docs for the window and the rules). Releases must cover at least
/// each account's window before the first sign-in, or that sign-in may read
/// as unexplained.
pub fn reconcile(
    accounts: &Accounts,
    events: &[Event],
    releases: &[Release],
    complete_until: OffsetDateTime,
) -> Reconciliation {
    let mut out = Reconciliation::default();
    let windows = accounts.windows();
    let mut ids = HashSet::new();
    // Per twokey account: its root sign-ins with MFA, and its releases.
    let mut sign_ins: BTreeMap<&str, Vec<&SignIn>> = BTreeMap::new();
    for event in events {
        if !ids.insert(event.event_id()) {
            out.ignored.duplicate_events += 1;
            continue;
        }
        let Some(mapped) = accounts.get(event.aws_account_id()) else {
            out.ignored.unmapped_events += 1;
            continue;
        };
        let account = mapped.account.clone();
        match event {
            Event::MfaDeviceChange(change) => out.findings.push(Finding::OutOfBand {
                account,
                change: change.clone(),
            }),
            Event::SignIn(s) if !s.is_root() => out.ignored.non_root_sign_ins += 1,
            Event::SignIn(s) => match s.outcome {
                SignInOutcome::Failure { .. } => out.findings.push(Finding::Failed {
                    account,
                    sign_in: s.clone(),
                }),
                SignInOutcome::Success { mfa_used: false } => {
                    out.findings.push(Finding::Unprotected {
                        account,
                        sign_in: s.clone(),
                    })
                }
                SignInOutcome::Success { mfa_used: true } => {
                    sign_ins.entry(&mapped.account).or_default().push(s)
                }
            },
        }
    }

    let mut by_account: BTreeMap<&str, Vec<&Release>> = BTreeMap::new();
    for release in releases {
        if windows.contains_key(release.account.as_str()) {
            by_account
                .entry(&release.account)
                .or_default()
                .push(release);
        } else {
            out.ignored.unmapped_releases += 1;
        }
    }
    let accounts_seen: std::collections::BTreeSet<&str> =
        sign_ins.keys().chain(by_account.keys()).copied().collect();
    for account in accounts_seen {
        let window = windows.get(account).copied().unwrap_or(DEFAULT_WINDOW);
        let mut signs = sign_ins.remove(account).unwrap_or_default();
        signs.sort_by(|a, b| (second(a.time), &a.event_id).cmp(&(second(b.time), &b.event_id)));
        let mut rels = by_account.remove(account).unwrap_or_default();
        rels.sort_by(|a, b| (a.at, &a.id).cmp(&(b.at, &b.id)));
        let mut taken = vec![false; rels.len()];
        let mut next = 0;
        for s in signs {
            let s_time = second(s.time);
            while next < rels.len() && second(rels[next].at) < s_time - window {
                next += 1;
            }
            if next < rels.len() && second(rels[next].at) <= s_time {
                taken[next] = true;
                out.findings.push(Finding::Matched {
                    account: account.to_owned(),
                    sign_in: s.clone(),
                    release: rels[next].clone(),
                });
                next += 1;
            } else {
                out.findings.push(Finding::Unexplained {
                    account: account.to_owned(),
                    sign_in: s.clone(),
                });
            }
        }
        for (release, taken) in rels.into_iter().zip(taken) {
            if taken {
                continue;
            }
            if second(release.at) + window <= complete_until {
                out.findings.push(Finding::Unused {
                    release: release.clone(),
                });
            } else {
                out.pending.push(release.clone());
            }
        }
    }
    out.findings
        .sort_by(|a, b| (a.time(), a.account(), a.kind()).cmp(&(b.time(), b.account(), b.kind())));
    out
}
