//! Hand-written `Debug` for the messages that carry a seed, a PIN or a code:
//! every secret field prints as `[redacted]`.

use std::fmt;

use crate::{broker::v1 as broker, types::v1 as types, vault::v1 as vault};

const REDACTED: &str = "[redacted]";

impl fmt::Debug for types::Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Code")
            .field("code", &REDACTED)
            .field("step", &self.step)
            .field("period", &self.period)
            .field("valid_from", &self.valid_from)
            .field("valid_until", &self.valid_until)
            .finish()
    }
}

impl fmt::Debug for vault::UnsealRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnsealRequest")
            .field("share", &REDACTED)
            .finish()
    }
}

impl fmt::Debug for vault::ReshareRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReshareRequest")
            .field("plan_id", &self.plan_id)
            .field("share", &REDACTED)
            .finish()
    }
}

/// `Debug` for a seed oneof: the variant's name, never its value.
macro_rules! redacted_seed {
    ($($ty:ty),+) => {$(
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    Self::OtpauthUri(_) => f.write_str("OtpauthUri([redacted])"),
                    Self::Base32Secret(_) => f.write_str("Base32Secret([redacted])"),
                }
            }
        }
    )+};
}

redacted_seed!(
    vault::enroll_request::Seed,
    broker::enroll_account_request::Seed
);

/// `Debug` for an enrolment request: its fields (the vault's also names
/// the actor), the seed through its redacting `Debug` above.
macro_rules! enroll_debug {
    ($ty:ty, $name:literal $(, $extra:ident)*) => {
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct($name)
                    .field("account_id", &self.account_id)
                    .field("seed", &self.seed)
                    .field("algorithm", &self.algorithm)
                    .field("digits", &self.digits)
                    .field("period", &self.period)
                    .field("issuer", &self.issuer)
                    .field("label", &self.label)
                    .field("replace", &self.replace)
                    $(.field(stringify!($extra), &self.$extra))*
                    .finish()
            }
        }
    };
}

enroll_debug!(vault::EnrollRequest, "EnrollRequest", actor);
enroll_debug!(broker::EnrollAccountRequest, "EnrollAccountRequest");

impl fmt::Debug for broker::VerifyPinRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyPinRequest")
            .field("request_id", &self.request_id)
            .field("pin", &REDACTED)
            .field("releases", &self.releases.len())
            .finish()
    }
}

impl fmt::Debug for broker::ShowPinResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShowPinResponse")
            .field("pin", &REDACTED)
            .field("expires_at", &self.expires_at)
            .field("request", &self.request)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_secrets() {
        let code = types::Code {
            code: "492039".into(),
            step: 1,
            period: 30,
            ..Default::default()
        };
        let enroll = vault::EnrollRequest {
            account_id: "a".into(),
            seed: Some(vault::enroll_request::Seed::Base32Secret(
                "JBSWY3DPEHPK3PXP".into(),
            )),
            ..Default::default()
        };
        let broker_enroll = broker::EnrollAccountRequest {
            seed: Some(broker::enroll_account_request::Seed::OtpauthUri(
                "otpauth://totp/x?secret=JBSWY3DPEHPK3PXP".into(),
            )),
            ..Default::default()
        };
        let pin = broker::VerifyPinRequest {
            request_id: "r".into(),
            pin: "831204".into(),
            ..Default::default()
        };
        let released = broker::ReleaseCodeResponse {
            code: Some(code.clone()),
            request: None,
        };
        let shown = broker::ShowPinResponse {
            pin: "831204".into(),
            ..Default::default()
        };
        let text = format!("{code:?} {enroll:?} {broker_enroll:?} {pin:?} {released:?} {shown:?}");
        for secret in ["492039", "JBSWY3DPEHPK3PXP", "831204"] {
            assert!(!text.contains(secret), "{secret} leaked into {text}");
        }
        assert!(text.contains("[redacted]"));
    }

    #[test]
    fn json_mapping_round_trips() {
        let code = types::Code {
            code: "012345".into(),
            step: 7,
            period: 30,
            valid_from: Some(crate::Timestamp {
                seconds: 210,
                nanos: 0,
            }),
            valid_until: None,
        };
        let json = serde_json::to_string(&code).expect("serialize");
        // proto3 JSON: lowerCamelCase names, 64-bit integers as strings,
        // timestamps as RFC 3339.
        assert!(json.contains("\"step\":\"7\""), "{json}");
        assert!(
            json.contains("\"validFrom\":\"1970-01-01T00:03:30Z\""),
            "{json}"
        );
        let back: types::Code = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, code);
    }
}
