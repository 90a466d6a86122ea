//! Grants: single-use, short-lived authorisations signed with the broker's
//! ed25519 grant key over the exact protobuf bytes, which the vault checks
//! before it computes a code or removes a seed.

use std::time::{Duration, SystemTime};

use ed25519_dalek::{Signer, SigningKey};
use prost::Message;
use twokey_proto::vault::v1::{Grant, GrantPurpose, SignedGrant};
use twokey_runtime::time::to_timestamp;

/// How long a grant lives.
pub const GRANT_LIFETIME: Duration = Duration::from_secs(60);

/// Signs grants.
pub struct GrantSigner {
    key: SigningKey,
}

impl std::fmt::Debug for GrantSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantSigner").finish_non_exhaustive()
    }
}

/// What a grant is for, and who stands behind it.
#[derive(Debug, Clone)]
pub struct GrantFacts {
    /// Release or removal.
    pub purpose: GrantPurpose,
    /// The broker request (empty for removal).
    pub request_id: String,
    /// The account.
    pub account_id: String,
    /// The requester (empty for removal).
    pub requester: String,
    /// The approvers (empty for removal).
    pub approvers: Vec<String>,
    /// The operator who verified the PIN, or the admin removing the account.
    pub operator: String,
}

impl GrantSigner {
    /// A signer with the grant key.
    pub fn new(key: SigningKey) -> Self {
        Self { key }
    }

    /// The public half, for the vault's config.
    pub fn verifying_key(&self) -> ed25519_dalek::VerifyingKey {
        self.key.verifying_key()
    }

    /// A fresh random grant id.
    pub fn new_grant_id() -> String {
        uuid::Uuid::new_v4().to_string()
    }

    /// A grant with id `grant_id` (use [`GrantSigner::new_grant_id`]), valid
    /// for [`GRANT_LIFETIME`] from `now`, signed.
    pub fn sign(
        &self,
        grant_id: String,
        facts: GrantFacts,
        now: SystemTime,
    ) -> (Grant, SignedGrant) {
        let grant = Grant {
            grant_id,
            purpose: facts.purpose as i32,
            request_id: facts.request_id,
            account_id: facts.account_id,
            requester: facts.requester,
            approvers: facts.approvers,
            operator: facts.operator,
            issued_at: Some(to_timestamp(now)),
            expires_at: Some(to_timestamp(now + GRANT_LIFETIME)),
        };
        let bytes = grant.encode_to_vec();
        let signature = self.key.sign(&bytes).to_bytes().to_vec();
        (
            grant,
            SignedGrant {
                grant: bytes,
                signature,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Signature;

    #[test]
    fn grants_verify_under_the_public_key_and_live_sixty_seconds() {
        let signer = GrantSigner::new(SigningKey::generate(&mut rand::rngs::OsRng));
        let now = SystemTime::now();
        let facts = GrantFacts {
            purpose: GrantPurpose::Release,
            request_id: "r".into(),
            account_id: "a".into(),
            requester: "spiffe://t/user/alice".into(),
            approvers: vec!["spiffe://t/user/bob".into()],
            operator: "spiffe://t/user/olivia".into(),
        };
        let (grant, signed) = signer.sign(GrantSigner::new_grant_id(), facts.clone(), now);
        let sig = Signature::from_slice(&signed.signature).unwrap();
        signer
            .verifying_key()
            .verify_strict(&signed.grant, &sig)
            .unwrap();
        let decoded = Grant::decode(signed.grant.as_slice()).unwrap();
        assert_eq!(decoded, grant);
        let life = decoded.expires_at.unwrap().seconds - decoded.issued_at.unwrap().seconds;
        assert!(life <= 60);
        let (other, _) = signer.sign(GrantSigner::new_grant_id(), facts, now);
        assert_ne!(other.grant_id, grant.grant_id);
    }
}
