//! The grant contract between broker and vault, in one place: a grant is the
//! broker's single-use, short-lived authorisation, signed with its ed25519
//! grant key over the exact encoded protobuf bytes. The broker signs with
//! [`GrantSigner`]; the vault checks signature, purpose, lifetime and account
//! with [`GrantVerifier`] (single use is enforced by the vault's store).

use std::time::{Duration, SystemTime};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use prost::Message;
use twokey_proto::vault::v1::{Grant, GrantPurpose, SignedGrant};

use crate::time::{from_timestamp, to_timestamp};

/// How long a grant the broker issues lives.
pub const GRANT_LIFETIME: Duration = Duration::from_secs(60);
/// Longest life the vault accepts (issued_at to expires_at): the issued
/// lifetime plus room for clock drift between the two hosts.
pub const MAX_GRANT_LIFETIME: Duration = Duration::from_secs(120);
/// How far in the future issued_at may lie (clock skew).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(30);
/// Why a grant was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// Missing or undecodable.
    #[error("malformed grant: {0}")]
    Malformed(String),
    /// Signature does not verify with the broker's grant key.
    #[error("grant signature does not verify with the broker's grant key")]
    BadSignature,
    /// Purpose is not what the call needs.
    #[error("grant purpose is {got}, this call needs {want}")]
    WrongPurpose {
        /// The grant's purpose.
        got: String,
        /// The purpose needed.
        want: &'static str,
    },
    /// Past its expiry.
    #[error("grant {0} has expired; ask the broker for a new release")]
    Expired(String),
    /// Lives longer than allowed.
    #[error("grant {0} lives longer than {max} s; refused", max = MAX_GRANT_LIFETIME.as_secs())]
    TooLongLived(String),
    /// Issued in the future.
    #[error("grant {0} is issued in the future; check the broker's and vault's clocks")]
    NotYetValid(String),
}

/// Verifies grants with the broker's public grant key.
#[derive(Debug, Clone)]
pub struct GrantVerifier {
    key: VerifyingKey,
}

impl GrantVerifier {
    /// A verifier for the broker's grant key.
    pub fn new(key: VerifyingKey) -> Self {
        Self { key }
    }

    /// Checks signature, purpose and lifetime at `now`; returns the grant.
    pub fn verify(
        &self,
        signed: Option<&SignedGrant>,
        want: GrantPurpose,
        now: SystemTime,
    ) -> Result<Grant, GrantError> {
        let signed = signed.ok_or_else(|| GrantError::Malformed("no grant given".into()))?;
        let signature =
            Signature::from_slice(&signed.signature).map_err(|_| GrantError::BadSignature)?;
        self.key
            .verify_strict(&signed.grant, &signature)
            .map_err(|_| GrantError::BadSignature)?;
        let grant = Grant::decode(signed.grant.as_slice())
            .map_err(|e| GrantError::Malformed(e.to_string()))?;
        if grant.grant_id.is_empty() || grant.grant_id.len() > 128 {
            return Err(GrantError::Malformed(
                "grant id must be 1 to 128 bytes".into(),
            ));
        }
        let purpose = GrantPurpose::try_from(grant.purpose).unwrap_or(GrantPurpose::Unspecified);
        if purpose != want {
            return Err(GrantError::WrongPurpose {
                got: purpose.as_str_name().to_owned(),
                want: want.as_str_name(),
            });
        }
        let issued = grant
            .issued_at
            .as_ref()
            .and_then(from_timestamp)
            .ok_or_else(|| GrantError::Malformed("issued_at missing or invalid".into()))?;
        let expires = grant
            .expires_at
            .as_ref()
            .and_then(from_timestamp)
            .ok_or_else(|| GrantError::Malformed("expires_at missing or invalid".into()))?;
        let Ok(life) = expires.duration_since(issued) else {
            return Err(GrantError::Malformed(
                "expires_at lies before issued_at".into(),
            ));
        };
        if life > MAX_GRANT_LIFETIME {
            return Err(GrantError::TooLongLived(grant.grant_id));
        }
        if issued > now + MAX_CLOCK_SKEW {
            return Err(GrantError::NotYetValid(grant.grant_id));
        }
        // Clock skew included, a grant is never good for longer than
        // MAX_GRANT_LIFETIME from the moment the vault sees it.
        if expires > now + MAX_GRANT_LIFETIME {
            return Err(GrantError::TooLongLived(grant.grant_id));
        }
        if now >= expires {
            return Err(GrantError::Expired(grant.grant_id));
        }
        Ok(grant)
    }
}

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
        format!("{:032x}", rand::random::<u128>())
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
        let signed = sign_grant(&self.key, &grant);
        (grant, signed)
    }
}

/// Signs `grant` with `key` over its exact encoded bytes: the one way a
/// grant is signed, by the broker and by tests that forge or replay one.
pub fn sign_grant(key: &SigningKey, grant: &Grant) -> SignedGrant {
    let bytes = grant.encode_to_vec();
    let signature = key.sign(&bytes).to_bytes().to_vec();
    SignedGrant {
        grant: bytes,
        signature,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // The vault's side of the contract accepts what the broker issues.
        let verified = GrantVerifier::new(signer.verifying_key())
            .verify(Some(&signed), GrantPurpose::Release, now)
            .unwrap();
        assert_eq!(verified, grant);
        assert!(GRANT_LIFETIME + MAX_CLOCK_SKEW <= MAX_GRANT_LIFETIME);
    }

    #[test]
    fn skew_never_stretches_a_grant_past_the_maximum_life() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let verifier = GrantVerifier::new(key.verifying_key());
        let now = SystemTime::now();
        let grant = |issued: SystemTime, life: Duration| {
            let g = Grant {
                grant_id: "g".into(),
                purpose: GrantPurpose::Release as i32,
                account_id: "a".into(),
                issued_at: Some(to_timestamp(issued)),
                expires_at: Some(to_timestamp(issued + life)),
                ..Default::default()
            };
            sign_grant(&key, &g)
        };
        // Issued 30 s ahead (the skew allowed) with a 110 s life: it would
        // be good for 140 s from now.
        let stretched = grant(now + MAX_CLOCK_SKEW, Duration::from_secs(110));
        assert_eq!(
            verifier.verify(Some(&stretched), GrantPurpose::Release, now),
            Err(GrantError::TooLongLived("g".into()))
        );
        // The same skew with the broker's 60 s lifetime is fine.
        let usual = grant(now + MAX_CLOCK_SKEW, GRANT_LIFETIME);
        assert!(
            verifier
                .verify(Some(&usual), GrantPurpose::Release, now)
                .is_ok()
        );
    }
}
