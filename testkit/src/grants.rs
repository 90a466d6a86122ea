//! Grants as the broker signs them, for tests, benchmarks and fuzzing: the
//! signing itself is `runtime::grant`'s, so a test's grant is byte for byte
//! what the vault sees in production.

use std::time::SystemTime;

use ed25519_dalek::SigningKey;
use twokey_proto::vault::v1::{Grant, GrantPurpose, SignedGrant};
use twokey_runtime::grant::{GRANT_LIFETIME, sign_grant};
use twokey_runtime::time::to_timestamp;

/// A grant with id `grant_id` for `account` and `purpose`, issued at `now`
/// for the broker's usual lifetime, with no people named.
pub fn grant(grant_id: &str, account: &str, purpose: GrantPurpose, now: SystemTime) -> Grant {
    Grant {
        grant_id: grant_id.to_owned(),
        purpose: purpose as i32,
        account_id: account.to_owned(),
        issued_at: Some(to_timestamp(now)),
        expires_at: Some(to_timestamp(now + GRANT_LIFETIME)),
        ..Default::default()
    }
}

/// A release grant for request `request_id` on `account` in trust domain
/// `td`, naming the local system's crew (requester alice, approver bob,
/// operator olivia), issued at `now` for the broker's usual lifetime: what
/// the broker signs after a real flow.
pub fn release(
    td: &str,
    grant_id: &str,
    request_id: &str,
    account: &str,
    now: SystemTime,
) -> Grant {
    Grant {
        request_id: request_id.to_owned(),
        requester: format!("spiffe://{td}/user/alice"),
        approvers: vec![format!("spiffe://{td}/user/bob")],
        operator: format!("spiffe://{td}/user/olivia"),
        ..grant(grant_id, account, GrantPurpose::Release, now)
    }
}

/// [`grant`], signed with `key`.
pub fn signed(
    key: &SigningKey,
    grant_id: &str,
    account: &str,
    purpose: GrantPurpose,
    now: SystemTime,
) -> SignedGrant {
    sign_grant(key, &grant(grant_id, account, purpose, now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use twokey_runtime::grant::GrantVerifier;

    #[test]
    fn a_test_grant_passes_the_vaults_check() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let now = SystemTime::now();
        let g = signed(&key, "g-1", "acct", GrantPurpose::Release, now);
        let verified = GrantVerifier::new(key.verifying_key())
            .verify(Some(&g), GrantPurpose::Release, now)
            .unwrap();
        assert_eq!(verified.account_id, "acct");
    }
}
