//! Wire ↔ domain for the vault: an enrollment request becomes a validated
//! [`Enrollment`] (`TryFrom`; its `actor` is ignored, the grant or the
//! admins' verified statements name who acted), and stored accounts,
//! computed codes and applied policy versions become their protobuf
//! messages.

use twokey_proto::{
    types::v1::{self as types, Account},
    vault::v1::{EnrollRequest, enroll_request},
};
use twokey_runtime::time::timestamp_from_secs;

use crate::{
    seed::{Algorithm, STRONG_SEED_BYTES, Seed, SeedError, SeedSpec, TotpParams, parse_otpauth},
    service::{Enrollment, VaultError, validate_account_id},
    store::AccountRecord,
    store::StoredPolicy,
    totp::CodeValue,
};

impl TryFrom<&EnrollRequest> for Enrollment {
    type Error = VaultError;

    fn try_from(request: &EnrollRequest) -> Result<Self, VaultError> {
        validate_account_id(&request.account_id)?;
        let spec = seed_spec(request)?;
        let period = spec.params.period;
        if request.min_seconds_left >= period {
            return Err(VaultError::InvalidArgument(format!(
                "min_seconds_left must be below the period of {period} s, not {}; 0 means the default",
                request.min_seconds_left
            )));
        }
        Ok(Self {
            account_id: request.account_id.clone(),
            spec,
            replace: request.replace,
            min_seconds_left: request.min_seconds_left,
            consent: request
                .consent
                .as_ref()
                .map(|c| c.statements.clone())
                .unwrap_or_default(),
        })
    }
}

/// Reads the seed and parameters out of an enrollment request.
fn seed_spec(request: &EnrollRequest) -> Result<SeedSpec, VaultError> {
    match &request.seed {
        Some(enroll_request::Seed::OtpauthUri(uri)) => Ok(parse_otpauth(uri)?),
        Some(enroll_request::Seed::Base32Secret(secret)) => {
            let algorithm = match types::Algorithm::try_from(request.algorithm) {
                Ok(types::Algorithm::Unspecified | types::Algorithm::Sha1) => Algorithm::Sha1,
                Ok(types::Algorithm::Sha256) => Algorithm::Sha256,
                Ok(types::Algorithm::Sha512) => Algorithm::Sha512,
                Err(_) => return Err(SeedError::BadAlgorithm(request.algorithm.to_string()).into()),
            };
            let digits = match request.digits {
                0 => 6,
                d => u8::try_from(d).map_err(|_| SeedError::BadDigits(d.to_string()))?,
            };
            let period = match request.period {
                0 => 30,
                p => p,
            };
            let params = TotpParams {
                algorithm,
                digits,
                period,
            }
            .validated()?;
            for (what, text) in [("issuer", &request.issuer), ("label", &request.label)] {
                if text.len() > 256 || text.chars().any(char::is_control) {
                    return Err(VaultError::InvalidArgument(format!(
                        "{what} must be at most 256 characters without control characters"
                    )));
                }
            }
            Ok(SeedSpec {
                seed: Seed::from_base32(secret)?,
                params,
                issuer: request.issuer.clone(),
                label: request.label.clone(),
            })
        }
        None => Err(VaultError::InvalidArgument(
            "no seed given: pass an otpauth URI or a Base32 secret".into(),
        )),
    }
}

fn proto_algorithm(a: Algorithm) -> types::Algorithm {
    match a {
        Algorithm::Sha1 => types::Algorithm::Sha1,
        Algorithm::Sha256 => types::Algorithm::Sha256,
        Algorithm::Sha512 => types::Algorithm::Sha512,
    }
}

impl From<&AccountRecord> for Account {
    fn from(r: &AccountRecord) -> Self {
        Self {
            account_id: r.account_id.clone(),
            issuer: r.issuer.clone(),
            label: r.label.clone(),
            algorithm: proto_algorithm(r.params.algorithm) as i32,
            digits: u32::from(r.params.digits),
            period: r.params.period,
            created_at: Some(timestamp_from_secs(r.created_at)),
            last_used_at: r.last_used_at.map(timestamp_from_secs),
            seed_bits: r.seed_bits,
            weak_seed: (r.seed_bits as usize) < STRONG_SEED_BYTES * 8,
            disabled: r.disabled,
        }
    }
}

impl From<&CodeValue> for types::Code {
    fn from(code: &CodeValue) -> Self {
        Self {
            code: code.code.as_str().to_owned(),
            step: code.step,
            period: code.period,
            valid_from: Some(timestamp_from_secs(code.valid_from)),
            valid_until: Some(timestamp_from_secs(code.valid_until)),
        }
    }
}

impl From<&StoredPolicy> for twokey_proto::vault::v1::PolicyVersion {
    fn from(p: &StoredPolicy) -> Self {
        Self {
            version: p.version,
            document: p.document.clone(),
            signatures: p.signature_bytes(),
            signed_by: p.signed_by.clone(),
            digest: p.digest_bytes(),
            applied_at: Some(timestamp_from_secs(p.applied_at)),
        }
    }
}
