//! The vault's metrics (see docs/OBSERVABILITY.md): codes released and
//! grants rejected (the grant itself, or the people's consent it came with:
//! reasons `consent`, `no_policy`, `disabled`), recorded by the gRPC layer
//! from each `GenerateCode` outcome. The only label is the reason of a
//! refusal, never a secret.

use std::sync::OnceLock;

use opentelemetry::{KeyValue, metrics::Counter};
use twokey_runtime::metrics::counter;

use crate::{service::VaultError, store::VaultStoreError};
use twokey_runtime::grant::GrantError;

struct Counters {
    codes_released: Counter<u64>,
    grant_rejections: Counter<u64>,
}

fn counters() -> &'static Counters {
    static COUNTERS: OnceLock<Counters> = OnceLock::new();
    COUNTERS.get_or_init(|| Counters {
        codes_released: counter(
            "twokey.vault.codes.released",
            "codes that left the vault (each after audit acknowledged code.released)",
            "{code}",
        ),
        grant_rejections: counter(
            "twokey.vault.grant.rejections",
            "grants the vault refused, by reason",
            "{grant}",
        ),
    })
}

/// One code released.
pub fn code_released() {
    counters().codes_released.add(1, &[]);
}

/// Why a grant was refused, if `error` is a refusal of the grant.
pub fn rejection_reason(error: &VaultError) -> Option<&'static str> {
    Some(match error {
        VaultError::Grant(g) => match g {
            GrantError::Malformed(_) => "malformed",
            GrantError::BadSignature => "bad_signature",
            GrantError::WrongPurpose { .. } => "wrong_purpose",
            GrantError::Expired(_) => "expired",
            GrantError::TooLongLived(_) => "too_long_lived",
            GrantError::NotYetValid(_) => "not_yet_valid",
            #[allow(unreachable_patterns, reason = "future variants count too")]
            _ => "other",
        },
        VaultError::Store(VaultStoreError::GrantUsed(_)) => "used",
        // The grant verified, the people's consent did not.
        VaultError::Consent(_) | VaultError::Store(VaultStoreError::Consent(_)) => "consent",
        VaultError::NoPolicy => "no_policy",
        VaultError::Store(VaultStoreError::Disabled(_)) => "disabled",
        _ => return None,
    })
}

/// Counts `error` if it refused a grant.
pub fn grant_rejected(error: &VaultError) {
    if let Some(reason) = rejection_reason(error) {
        counters()
            .grant_rejections
            .add(1, &[KeyValue::new("reason", reason)]);
    }
}
