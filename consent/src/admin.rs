//! M-of-N admin actions on an account (enroll with replace, remove, disable,
//! enable, restore) or on the vault itself (rotate the key, seal; an empty
//! account id): each admin signs their own statement binding the account,
//! the action and one shared single-use action id; the vault checks M
//! distinct admins of the account (of the policy, for a vault-wide action)
//! consented, under the active policy, recently, and that the id is unused.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use crate::check::{Signer, binding_mismatch, check_id, need_role, open};
use crate::error::{ConsentError, Role, StatementRef};
use crate::history::AdminHistory;
use crate::policy::{Policy, VerifiedPolicy};
use crate::statement::{AdminAction, Binding, SignedStatement, StatementKind};
use crate::time::unix_secs;

/// Most admin statements accepted for one action.
pub const MAX_ADMIN_STATEMENTS: usize = 32;

/// What the vault is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminActionRequest {
    /// The account.
    pub account_id: String,
    /// The action.
    pub action: AdminAction,
}

/// An admin action whose consent verified. The vault names these admins as
/// the actors of its event and records the action id as used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedAdminAction {
    /// The active policy version.
    pub policy_version: u64,
    /// The account.
    pub account_id: String,
    /// The action.
    pub action: AdminAction,
    /// The single-use action id.
    pub action_id: String,
    /// The distinct admins who consented, each once, in the order presented.
    pub admins: Vec<Signer>,
    /// How long a replaced or removed seed is kept for restore (the
    /// account's, or 7 days for an account the policy does not list).
    pub recovery_window: Duration,
}

/// A human name for an admin action.
pub fn action_name(action: AdminAction) -> &'static str {
    match action {
        AdminAction::Unspecified => "no action",
        AdminAction::EnrollReplace => "enroll with replace",
        AdminAction::Remove => "remove",
        AdminAction::Disable => "disable",
        AdminAction::Enable => "enable",
        AdminAction::Restore => "restore",
        AdminAction::RotateKey => "rotate-key",
        AdminAction::SealVault => "seal",
    }
}

/// Whether `action` is on the vault itself (its statements bind an empty
/// account id, and the policy's `[admins]` and threshold decide) rather
/// than on one account.
pub fn is_vault_wide(action: AdminAction) -> bool {
    matches!(action, AdminAction::RotateKey | AdminAction::SealVault)
}

/// An action and what it is on, for messages: `remove of account X`, or
/// `rotate-key of the vault`.
pub fn describe(action: AdminAction, account_id: &str) -> String {
    if account_id.is_empty() {
        format!("{} of the vault", action_name(action))
    } else {
        format!("{} of account {account_id}", action_name(action))
    }
}

/// Checks M-of-N admin consent to `action`: every statement must verify
/// under the active policy (as in [`check_release`](crate::check_release)),
/// bind this account and action and the same action id, be signed within the
/// policy's `admin_action_window`, and come from an admin of the account
/// (its own `admins`, else the policy's); at least the admin threshold of
/// distinct people (one person's several statements count once); the action
/// id not used before. A vault-wide action ([`is_vault_wide`]) must name the
/// empty account id and is decided by the policy's `[admins]` and threshold;
/// an account action must name an account.
pub fn check_admin_action<H: AdminHistory + ?Sized>(
    policy: &VerifiedPolicy,
    action: &AdminActionRequest,
    statements: &[SignedStatement],
    now: SystemTime,
    already: &H,
) -> Result<VerifiedAdminAction, ConsentError> {
    let policy: &Policy = policy;
    let now_secs = unix_secs(now);
    if action.action == AdminAction::Unspecified {
        return Err(ConsentError::Malformed {
            statement: StatementRef::AdminAction(0),
            detail: "no action named".into(),
        });
    }
    if is_vault_wide(action.action) != action.account_id.is_empty() {
        return Err(ConsentError::Malformed {
            statement: StatementRef::AdminAction(0),
            detail: if action.account_id.is_empty() {
                format!("{} needs an account id", action_name(action.action))
            } else {
                format!(
                    "{} is on the vault itself, not on account {}",
                    action_name(action.action),
                    action.account_id
                )
            },
        });
    }
    if statements.is_empty() {
        return Err(ConsentError::Missing {
            statement: StatementRef::AdminAction(0),
        });
    }
    if statements.len() > MAX_ADMIN_STATEMENTS {
        return Err(ConsentError::Malformed {
            statement: StatementRef::AdminAction(MAX_ADMIN_STATEMENTS),
            detail: format!("more than {MAX_ADMIN_STATEMENTS} admin statements"),
        });
    }
    let window = i64::try_from(policy.admin_action_window().as_secs()).unwrap_or(i64::MAX);
    let mut action_id: Option<String> = None;
    let mut seen = BTreeSet::new();
    let mut admins = Vec::new();
    for (i, signed) in statements.iter().enumerate() {
        let at = StatementRef::AdminAction(i);
        let s = open(policy, at, signed, StatementKind::AdminAction, now_secs)?;
        let Some(Binding::AdminAction(b)) = &s.statement.binding else {
            return Err(binding_mismatch(at));
        };
        if b.account_id != action.account_id || b.action != action.action as i32 {
            return Err(ConsentError::WrongBinding {
                statement: at,
                signer: s.signer.spiffe_id.clone(),
                field: "action",
                detail: format!(
                    "it consents to {}, the vault is asked to {}",
                    describe(
                        AdminAction::try_from(b.action).unwrap_or_default(),
                        &b.account_id
                    ),
                    describe(action.action, &action.account_id)
                ),
            });
        }
        check_id(at, "action_id", &b.action_id)?;
        match &action_id {
            None => action_id = Some(b.action_id.clone()),
            Some(first) if *first != b.action_id => {
                return Err(ConsentError::WrongBinding {
                    statement: at,
                    signer: s.signer.spiffe_id.clone(),
                    field: "action id",
                    detail: format!(
                        "it names action {}, the first statement {first}",
                        b.action_id
                    ),
                });
            }
            Some(_) => {}
        }
        need_role(
            policy,
            at,
            &action.account_id,
            s.person,
            &s.signer.spiffe_id,
            Role::Admin,
        )?;
        if now_secs > s.issued_at.saturating_add(window) {
            return Err(ConsentError::Stale {
                statement: at,
                signer: s.signer.spiffe_id.clone(),
                detail: format!(
                    "signed {} s ago, an admin statement is good for {window} s; sign again",
                    now_secs - s.issued_at
                ),
            });
        }
        if seen.insert(s.person) {
            admins.push(s.signer);
        }
    }
    let action_id = action_id.unwrap_or_default();
    let need = policy.admin_threshold();
    if (admins.len() as u64) < u64::from(need) {
        return Err(ConsentError::TooFewAdmins {
            account: action.account_id.clone(),
            action: action_name(action.action),
            have: admins.iter().map(|a| a.person.clone()).collect(),
            need,
        });
    }
    if already.action_id_used(&action_id) {
        return Err(ConsentError::AdminActionReplayed { action_id });
    }
    Ok(VerifiedAdminAction {
        policy_version: policy.version(),
        account_id: action.account_id.clone(),
        action: action.action,
        action_id,
        admins,
        recovery_window: policy
            .account(&action.account_id)
            .map_or(Duration::from_secs(7 * 86_400), |a| a.recovery_window),
    })
}
