//! What the vault has already done, as the checks need to see it: used
//! release and admin-action ids, codes released per request and per account.
//! The vault implements these traits over its store (persisted, so that
//! single use, `codes_per_request` and the rate hold across restarts);
//! [`MemoryHistory`] is the in-memory one for tests and tools.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use crate::admin::VerifiedAdminAction;
use crate::check::Verified;
use crate::time::unix_secs;

/// The releases the vault has made.
pub trait ReleaseHistory {
    /// Whether a release with this id was already used.
    fn release_id_used(&self, release_id: &str) -> bool;
    /// Codes released for the request with this statement digest.
    fn codes_released(&self, request_digest: &[u8; 32]) -> u32;
    /// Codes released for the account at or after `since`.
    fn releases_since(&self, account_id: &str, since: SystemTime) -> u32;
}

/// The admin actions the vault has carried out.
pub trait AdminHistory {
    /// Whether an admin action with this id was already carried out.
    fn action_id_used(&self, action_id: &str) -> bool;
}

/// An in-memory history.
#[derive(Debug, Clone, Default)]
pub struct MemoryHistory {
    release_ids: BTreeSet<String>,
    per_request: BTreeMap<[u8; 32], u32>,
    per_account: BTreeMap<String, Vec<i64>>,
    action_ids: BTreeSet<String>,
}

impl MemoryHistory {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a release made at `at`.
    pub fn record_release(&mut self, release: &Verified, at: SystemTime) {
        self.release_ids.insert(release.release_id.clone());
        *self.per_request.entry(release.request_digest).or_default() += 1;
        self.per_account
            .entry(release.account_id.clone())
            .or_default()
            .push(unix_secs(at));
    }

    /// Records an admin action carried out.
    pub fn record_admin_action(&mut self, action: &VerifiedAdminAction) {
        self.action_ids.insert(action.action_id.clone());
    }
}

impl ReleaseHistory for MemoryHistory {
    fn release_id_used(&self, release_id: &str) -> bool {
        self.release_ids.contains(release_id)
    }

    fn codes_released(&self, request_digest: &[u8; 32]) -> u32 {
        self.per_request.get(request_digest).copied().unwrap_or(0)
    }

    fn releases_since(&self, account_id: &str, since: SystemTime) -> u32 {
        let since = unix_secs(since);
        let n = self
            .per_account
            .get(account_id)
            .map_or(0, |v| v.iter().filter(|&&t| t >= since).count());
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

impl AdminHistory for MemoryHistory {
    fn action_id_used(&self, action_id: &str) -> bool {
        self.action_ids.contains(action_id)
    }
}
