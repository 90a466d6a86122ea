//! Grant verification: a grant is the broker's single-use, short-lived
//! authorisation, signed with its ed25519 grant key over the exact encoded
//! bytes. The vault checks signature, purpose, lifetime and account here;
//! single use is enforced by the store.

use std::time::{Duration, SystemTime};

use ed25519_dalek::{Signature, VerifyingKey};
use prost::Message;
use twokey_proto::vault::v1::{Grant, GrantPurpose, SignedGrant};
use twokey_runtime::time::from_timestamp;

/// Longest life a grant may have (issued_at to expires_at).
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
    #[error("grant {0} lives longer than 120 s; refused")]
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
        if now >= expires {
            return Err(GrantError::Expired(grant.grant_id));
        }
        Ok(grant)
    }
}
